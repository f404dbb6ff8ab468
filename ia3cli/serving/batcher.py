"""The model side of ``ia3 serve``: dynamic batching across adapters, the generation step loop, classification.

- :class:`Batcher` collects requests on the event loop and hands batches to one model thread: it waits at most
  ``max_wait_ms`` after the oldest waiting request for others, up to ``max_batch_size`` rows, whatever adapters
  they name. Every touch of the model (batches, loads, unloads) runs on that one thread, so none races another,
  and torch releases the GIL while it computes, so the event loop keeps answering.
- :func:`generate` is a step loop over the batch (prefill, then one token per row per step with the KV cache),
  each row with its own adapter, sampling settings and stop conditions. Tokens go to per-row asyncio queues as
  they come. A row that finishes, or whose client went away, is dropped from the batch at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ia3cli.scoring.loglik import pad_id
from ia3cli.serving.adapter_pool import AdapterPool, BadInput

if TYPE_CHECKING:
    import torch

    from ia3cli.config.recipe import Recipe
    from ia3cli.serving.prometheus import Metrics
    from ia3cli.tuners.mixed import MixedIA3


@dataclass
class Row:
    """One sequence to generate; the worker thread fills ``out`` with ``("token", id)`` then ``("done", reason)``."""

    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the request side: client gone, or a stop string matched

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))


@dataclass
class ClassifyItem:
    """Inputs of one /v1/classify request (texts, or rows of the adapter's columns); the worker sets ``future``."""

    adapter: str | None
    rows: list[str | dict[str, Any]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        def done() -> None:
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(value)

        self.loop.call_soon_threadsafe(done)


def _pick(logits: torch.Tensor, row: Row, generator: torch.Generator | None) -> int:
    import torch

    if row.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / row.temperature, dim=-1)
    if row.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < row.top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(mixed: MixedIA3, rows: list[Row], metrics: Metrics) -> None:
    """Generate every row of a mixed-adapter batch, one token per row per step, pushing tokens as they come.

    Prompts are left-padded so each row's last prompt token sits in the last column; position ids skip the
    padding, so each row sees exactly what it would see alone. Rows stop at EOS (unless ``ignore_eos``), at
    ``max_tokens``, or when cancelled; stopped rows leave the batch (and its KV cache) before the next step.
    """
    import torch

    model, tok = mixed.model, mixed.tokenizer
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {tok.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    pad = pad_id(tok)
    width = max(len(r.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in rows]
    active = list(range(len(rows)))
    produced = [0] * len(rows)
    with torch.inference_mode(), mixed.select([r.adapter for r in rows]):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, last_pos = out.past_key_values, positions[:, -1]
    while True:
        logits = out.logits[:, -1]
        keep: list[int] = []
        tokens: list[int] = []
        for j, i in enumerate(active):
            row = rows[i]
            if row.cancelled:
                metrics.inc("ia3_rows_cancelled_total")
                row.emit("done", "cancelled")
                continue
            token = _pick(logits[j], row, generators[i])
            if token in eos and not row.ignore_eos:
                row.emit("done", "stop")
                continue
            row.emit("token", token)
            produced[i] += 1
            metrics.inc("ia3_tokens_generated_total")
            if produced[i] >= row.max_tokens:
                row.emit("done", "length")
                continue
            keep.append(j)
            tokens.append(token)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep)
            cache.batch_select_indices(index)
            mask, last_pos = mask[index], last_pos[index]
            active = [active[j] for j in keep]
        metrics.set("ia3_active_rows", len(active))
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype)], dim=1)
        last_pos = last_pos + 1
        with torch.inference_mode(), mixed.select([rows[i].adapter for i in active]):
            out = model(
                input_ids=torch.tensor(tokens).unsqueeze(1),
                attention_mask=mask,
                position_ids=last_pos.unsqueeze(1),
                past_key_values=cache,
                use_cache=True,
            )
    metrics.set("ia3_active_rows", 0)


def choice_labels(recipe: Recipe, mixed: MixedIA3) -> list[str] | None:
    """Class names of an adapter that classifies (a seq-cls head, or verbalisers of a choice task), else ``None``."""
    d = recipe.data
    if recipe.model.task == "seq-cls":
        id2label = getattr(mixed.model.config, "id2label", None) or {}
        return list(d.label_names or [id2label.get(i, f"LABEL_{i}") for i in range(recipe.num_labels)])
    if recipe.has_choices:
        return list(d.label_names or [])  # per-row choices (data.choices_column): see row_labels
    return None


def row_labels(recipe: Recipe, mixed: MixedIA3, row: dict[str, Any]) -> list[str]:
    """The classes one input is ranked over: its own choices (``data.choices_column``), else the adapter's."""
    from ia3cli.data.encoding import row_choices

    if recipe.model.task != "seq-cls" and recipe.data.choices_column:
        return row_choices(row, recipe.data)
    return choice_labels(recipe, mixed) or []


def classify(mixed: MixedIA3, items: list[ClassifyItem], recipes: dict[str | None, Recipe]) -> None:
    """Class probabilities for every input of every item, all adapters in one forward.

    seq-cls adapters: softmax over the head's logits (each row through its adapter's head). Choice adapters
    (causal-lm/seq2seq with ``data.label_names``): softmax over the length-normalised log-likelihood of each
    verbaliser, the score rank classification uses.
    """
    import torch

    from ia3cli.data.encoding import prompt_text
    from ia3cli.scoring.evaluation import choice_features
    from ia3cli.scoring.loglik import pad_batch, sequence_logprobs

    tok = mixed.tokenizer
    pad = pad_id(tok)
    feats: list[dict[str, Any]] = []
    names: list[str | None] = []
    for item in items:
        recipe = recipes[item.adapter]
        for row in item.rows:
            if mixed.task == "seq-cls":
                d = recipe.data
                pair = row.get(d.text_pair_column) if d.text_pair_column else None
                feats.append(dict(tok(prompt_text(row, d), pair, truncation=True, max_length=d.max_length)))
                names.append(item.adapter)
            else:
                for f in choice_features(row, recipe, tok):
                    feats.append(f)
                    names.append(item.adapter)
    with torch.inference_mode():
        if mixed.task == "seq-cls":
            with mixed.select(names):
                scores = mixed.model(**pad_batch(feats, pad)).logits.float()
        else:
            select = lambda idx: mixed.select([names[i] for i in idx])  # noqa: E731
            scored = sequence_logprobs(mixed.model, feats, pad, max(len(feats), 1), select=select)
            scores = torch.tensor([total / max(count, 1) for total, count in scored])
    start = 0
    for item in items:
        recipe, labels, probs = recipes[item.adapter], [], []
        for row in item.rows:
            labels.append(row_labels(recipe, mixed, row))
            width = 1 if mixed.task == "seq-cls" else len(labels[-1])
            row_scores = scores[start] if mixed.task == "seq-cls" else scores[start : start + width]
            probs.append(torch.softmax(row_scores, -1).tolist())
            start += width
        item.resolve({"labels": labels, "probabilities": probs})


@dataclass
class _Waiting:
    kind: str  # "generate" | "classify"
    work: Row | ClassifyItem
    size: int
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Dynamic batching on the event loop, model work on one thread.

    Args:
        mixed: The model.
        pool: The adapter LRU (its bound caps the distinct adapters in one batch too).
        metrics: Counters and histograms.
        max_batch_size: Rows per batch.
        max_wait_ms: How long the oldest waiting request may wait for others to join its batch.
    """

    def __init__(
        self, mixed: MixedIA3, pool: AdapterPool, metrics: Metrics, max_batch_size: int, max_wait_ms: float
    ) -> None:
        self.mixed, self.pool, self.metrics = mixed, pool, metrics
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ia3-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._thread.shutdown(wait=True, cancel_futures=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the model thread (adapter loads and unloads), between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def on_model_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` on the model thread without waiting for it (from any thread).

        Raises:
            RuntimeError: when the batcher has stopped.
        """
        self._thread.submit(fn, *args)

    def submit_rows(self, rows: list[Row]) -> None:
        for row in rows:
            self._waiting.append(_Waiting("generate", row, 1))
        self._changed()

    def submit_classify(self, item: ClassifyItem) -> None:
        self._waiting.append(_Waiting("classify", item, len(item.rows)))
        self._changed()

    def _changed(self) -> None:
        self.metrics.set("ia3_queue_rows", sum(w.size for w in self._waiting))
        self._wake.set()

    def _take(self) -> tuple[str, list[_Waiting]]:
        """The next batch: the oldest request's kind, in arrival order, up to the row and adapter bounds."""
        kind = self._waiting[0].kind
        taken: list[_Waiting] = []
        adapters: set[str] = set()
        rows = 0
        for w in list(self._waiting):
            if w.kind != kind:
                continue
            new = {w.work.adapter} - {None} - adapters
            if taken and (rows + w.size > self.max_batch_size or len(adapters | new) > self.pool.max_adapters):
                break
            taken.append(w)
            adapters |= new
            rows += w.size
        for w in taken:
            self._waiting.remove(w)
        self._changed()
        return kind, taken

    def _ready(self) -> bool:
        rows = sum(w.size for w in self._waiting if w.kind == self._waiting[0].kind)
        return rows >= self.max_batch_size or time.monotonic() - self._waiting[0].arrived >= self.max_wait

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if not self._waiting:
                await self._wake.wait()
                continue
            if not self._ready():
                left = self.max_wait - (time.monotonic() - self._waiting[0].arrived)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=max(left, 0.0005))
                continue
            kind, taken = self._take()
            await loop.run_in_executor(self._thread, self._run_batch, kind, [w.work for w in taken])

    def _run_batch(self, kind: str, works: list[Any]) -> None:
        """Model thread: load the batch's adapters, fail the rows whose adapter cannot load, run the rest."""
        live = [w for w in works if not (kind == "generate" and w.cancelled)]
        failed = self.pool.ensure({w.adapter for w in live} - {None})
        runnable = []
        for w in live:
            if w.adapter in failed:
                self._fail(kind, w, failed[w.adapter])
            else:
                runnable.append(w)
        if not runnable:
            return
        self.metrics.observe("ia3_batch_rows", sum(1 if kind == "generate" else len(w.rows) for w in runnable))
        self.metrics.observe("ia3_batch_adapters", len({w.adapter for w in runnable}))
        try:
            if kind == "generate":
                generate(self.mixed, runnable, self.metrics)
            else:
                recipes = {w.adapter: self.recipe(w.adapter) for w in runnable}
                runnable = [w for w in runnable if self._classifiable(w, recipes[w.adapter])]
                if runnable:
                    classify(self.mixed, runnable, recipes)
        except Exception as exc:  # a failed batch must not kill the server; each request reports it
            for w in runnable:
                self._fail(kind, w, exc)

    def recipe(self, adapter: str | None) -> Recipe:
        """The recipe an adapter was trained with (the base's for ``None``)."""
        return self.mixed.recipe if adapter is None else self.mixed.adapter_recipe(adapter)

    def _classifiable(self, item: ClassifyItem, recipe: Recipe) -> bool:
        """Fail an item whose adapter does not classify or whose rows lack a prompt-template field."""
        from ia3cli.data.encoding import prompt_text

        name = item.adapter or self.mixed.base_name
        if choice_labels(recipe, self.mixed) is None:
            item.resolve(error=BadInput(f"model '{name}' is not a classifier (no seq-cls head, no data.label_names)"))
            return False
        item.rows = [r if isinstance(r, dict) else {recipe.data.text_column: r} for r in item.rows]
        column = recipe.data.choices_column if recipe.model.task != "seq-cls" else None
        for i, row in enumerate(item.rows):
            value = row.get(column) if column else None
            if column and not (isinstance(value, list) and len(value) >= 2 and all(isinstance(c, str) for c in value)):
                why = f"input {i} needs a list of at least 2 choices in field '{column}' (data.choices_column)"
                item.resolve(error=BadInput(f"{why} of model '{name}'"))
                return False
            try:
                prompt_text(row, recipe.data)
            except (KeyError, IndexError) as exc:
                item.resolve(error=BadInput(f"input lacks field {exc} of model '{name}''s prompt template"))
                return False
        return True

    @staticmethod
    def _fail(kind: str, work: Any, exc: BaseException) -> None:
        if kind == "generate":
            work.emit("error", exc)
        else:
            work.resolve(error=exc)
