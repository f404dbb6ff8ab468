"""The model side of ``ia3 serve``: dynamic and continuous batching across adapters, classification, failures.

- :class:`Batcher` collects requests on the event loop and hands batches to one model thread: it waits at most
  ``max_wait_ms`` after the oldest waiting request for others, up to ``max_batch_size`` rows, whatever adapters
  they name. Every touch of the model (batches, loads, unloads) runs on that one thread, so none races another,
  and torch releases the GIL while it computes, so the event loop keeps answering.
- While a generation batch runs, completion rows that arrive join it at its next step (continuous batching, see
  :mod:`ia3cli.serving.generation`), up to ``max_batch_size`` rows and the adapter bound. Classify requests and
  adapter loads/unloads wait for the batch to end, and while one waits no row joins, so the batch drains.
- A batch that raises fails its requests (HTTP 500), not the server; it is counted (``ia3_batches_failed_total``)
  and after :data:`DEGRADED_AFTER` failed batches in a row ``/health`` answers 503 ``degraded`` until one succeeds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ia3cli.models.device import to_inputs
from ia3cli.scoring.loglik import pad_id
from ia3cli.serving.adapter_pool import AdapterPool, BadInput
from ia3cli.serving.generation import Row, generate

__all__ = ["DEGRADED_AFTER", "Batcher", "ClassifyItem", "Row", "choice_labels", "classify"]

DEGRADED_AFTER = 3  # failed batches in a row before /health reports degraded

if TYPE_CHECKING:
    from ia3cli.config.recipe import Recipe
    from ia3cli.serving.prometheus import Metrics
    from ia3cli.tuners.mixed import MixedIA3


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
    from ia3cli.scoring.loglik import mean_logprobs, pad_batch

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
                scores = mixed.model(**to_inputs(pad_batch(feats, pad), mixed.model)).logits.float()
        else:
            select = lambda idx: mixed.select([names[i] for i in idx])  # noqa: E731
            scores = torch.tensor(mean_logprobs(mixed.model, feats, pad, max(len(feats), 1), select=select))
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
        join: Let rows join a running generation batch (``False`` only as a benchmark's baseline).

    Attributes:
        failures_in_a_row: Batches that raised since the last one that did not.
        last_error: The newest failed batch's exception, as text.
    """

    def __init__(
        self,
        mixed: MixedIA3,
        pool: AdapterPool,
        metrics: Metrics,
        max_batch_size: int,
        max_wait_ms: float,
        *,
        join: bool = True,
    ) -> None:
        self.mixed, self.pool, self.metrics = mixed, pool, metrics
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.join = join
        self.failures_in_a_row = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()  # _waiting is read by the model thread too (rows joining a batch)
        self._calls = 0  # adapter loads/unloads waiting for the model thread: no row joins meanwhile
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ia3-model")
        self._task: asyncio.Task | None = None
        self._current: list[Any] = []  # the model thread's batch, joined rows included

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
        self._calls += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        finally:
            self._calls -= 1

    def on_model_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` on the model thread without waiting for it (from any thread).

        Raises:
            RuntimeError: when the batcher has stopped.
        """
        self._thread.submit(fn, *args)

    def submit_rows(self, rows: list[Row]) -> None:
        with self._lock:
            self._waiting.extend(_Waiting("generate", row, 1) for row in rows)
        self._changed()

    def submit_classify(self, item: ClassifyItem) -> None:
        with self._lock:
            self._waiting.append(_Waiting("classify", item, len(item.rows)))
        self._changed()

    def _changed(self, wake: bool = True) -> None:
        self.metrics.set("ia3_queue_rows", sum(w.size for w in list(self._waiting)))
        if wake:  # on the event loop only (asyncio.Event is not thread-safe)
            self._wake.set()

    def _take(self, kind: str, rows: int = 0, adapters: set[str] | None = None) -> list[_Waiting]:
        """Waiting requests of ``kind``, in arrival order, that fit beside ``rows`` rows of ``adapters``."""
        taken: list[_Waiting] = []
        adapters = set(adapters or ())
        with self._lock:
            for w in list(self._waiting):
                if w.kind != kind:
                    continue
                new = {w.work.adapter} - {None} - adapters
                if (taken or rows) and (
                    rows + w.size > self.max_batch_size or len(adapters | new) > self.pool.max_adapters
                ):
                    break
                taken.append(w)
                adapters |= new
                rows += w.size
            for w in taken:
                self._waiting.remove(w)
        return taken

    def _ready(self) -> bool:
        with self._lock:
            rows = sum(w.size for w in self._waiting if w.kind == self._waiting[0].kind)
            oldest = self._waiting[0].arrived
        return rows >= self.max_batch_size or time.monotonic() - oldest >= self.max_wait

    def _admit(self, running: list[Row]) -> list[Row]:
        """Model thread, between two generation steps: the completion rows that join the running batch now."""
        with self._lock:
            blocked = self._calls > 0 or any(w.kind == "classify" for w in self._waiting)
        if blocked or not self.join or len(running) >= self.max_batch_size:
            return []
        adapters = {r.adapter for r in running} - {None}
        taken = [w.work for w in self._take("generate", len(running), adapters)]
        if not taken:
            return []
        self._changed(wake=False)
        live = [r for r in taken if not r.cancelled]
        failed = self.pool.ensure(adapters | {r.adapter for r in live} - {None})
        joining = []
        for row in live:
            if row.adapter in failed:
                self._fail("generate", row, failed[row.adapter])
            else:
                joining.append(row)
        self._current += joining
        if joining:
            self.metrics.observe("ia3_batch_rows", len(joining))
        return joining

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
            taken = self._take(self._waiting[0].kind)
            self._changed()
            await loop.run_in_executor(self._thread, self._run_batch, taken[0].kind, [w.work for w in taken])

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
        self._current = list(runnable)  # rows that join the batch are added by _admit
        try:
            if kind == "generate":
                generate(self.mixed, runnable, self.metrics, self._admit)
            else:
                recipes = {w.adapter: self.recipe(w.adapter) for w in runnable}
                runnable = [w for w in runnable if self._classifiable(w, recipes[w.adapter])]
                if runnable:
                    classify(self.mixed, runnable, recipes)
        except Exception as exc:  # a failed batch must not kill the server; each request reports it
            self.failures_in_a_row += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.metrics.inc("ia3_batches_failed_total", kind=kind)
            for w in self._current:
                if kind != "generate" or not w.finished:
                    self._fail(kind, w, exc)
        else:
            self.failures_in_a_row = 0
        finally:
            self._current = []

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
