"""The generation step loop of ``ia3 serve``, with continuous batching: rows join a running batch at the next step.

A batch generates one token per row per step from a shared key/value cache. Without joining, a request that
arrives while a batch runs waits for its longest row (``max_tokens`` in the hundreds on a GPU). Here, between two
steps, the loop asks for newcomers (``admit``), prefills them in one forward of their own, and stacks their cache
under the running one:

- Prompts are left-padded, so every row's newest token sits in the last column. A running cache of width ``W`` and
  a newcomers' cache of width ``w`` are both left-padded to ``max(W, w)`` with zeros that the attention mask hides,
  then concatenated along the batch; masks the same way. Position ids are kept per row (counting only real
  tokens), so each row sees exactly what it would alone: the same greedy tokens.
- Rows that finish (EOS, ``max_tokens``, cancelled) leave the cache at the next step, and columns no remaining row
  uses any more (left padding of rows that left) are cut off the front, so a long-gone long prompt costs nothing.
- Everything (inputs, mask, positions, cache, sampling generators) lives on the device of the model's input
  embeddings; greedy rows take one ``argmax`` for the whole batch per step.

Joining needs a cache of plain per-layer tensors (``DynamicCache`` of ``DynamicLayer``, what decoder-only models
use by default); a model with another cache (sliding-window layers) generates each batch to the end instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ia3cli.models.device import input_device
from ia3cli.scoring.loglik import pad_id

if TYPE_CHECKING:
    import torch

    from ia3cli.serving.prometheus import Metrics
    from ia3cli.tuners.mixed import MixedIA3


@dataclass
class Row:
    """One sequence to generate; the model thread fills ``out`` with ``("token", id)`` then ``("done", reason)``
    (or ``("error", exception)``)."""

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
    finished: bool = False  # set by the model thread with the last event

    def emit(self, kind: str, value: Any) -> None:
        if kind != "token":
            self.finished = True
        self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))


def _pick(logits: torch.Tensor, row: Row, generator: torch.Generator | None) -> int:
    import torch

    probs = torch.softmax(logits.float() / row.temperature, dim=-1)
    if row.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < row.top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    import torch

    extra = width - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class Running:
    """The batch in flight: its rows, their KV cache, attention mask, positions and next-token logits."""

    def __init__(self, mixed: MixedIA3, metrics: Metrics) -> None:
        model, tok = mixed.model, mixed.tokenizer
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = {tok.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
        self.pad = pad_id(tok)
        self.mixed, self.metrics, self.device = mixed, metrics, input_device(model)
        self.rows: list[Row] = []
        self.generators: list[Any] = []
        self.produced: list[int] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, width] long
        self.last_pos: Any = None  # [rows] position id of each row's newest token
        self.logits: Any = None  # [rows, vocab] for each row's next token
        self.joinable = False

    def join(self, rows: list[Row]) -> None:
        """Prefill ``rows`` (left-padded, each with its adapter) and stack them under the running rows."""
        import torch

        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode(), self.mixed.select([r.adapter for r in rows]):
            out = self.mixed.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
            )
        cache, logits = out.past_key_values, out.logits[:, -1]
        if not self.rows:
            self.cache, self.mask, self.last_pos, self.logits = cache, mask, positions[:, -1], logits
            self.joinable = _joinable(cache)
        else:
            full = max(self.mask.shape[1], width)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, full, -2), _left_pad(theirs.keys, full, -2)])
                mine.values = torch.cat([_left_pad(mine.values, full, -2), _left_pad(theirs.values, full, -2)])
            self.mask = torch.cat([_left_pad(self.mask, full, 1), _left_pad(mask, full, 1)])
            self.last_pos = torch.cat([self.last_pos, positions[:, -1]])
            self.logits = torch.cat([self.logits, logits])
        self.rows += rows
        self.generators += [
            torch.Generator(device=self.device).manual_seed(r.seed) if r.seed is not None else None for r in rows
        ]
        self.produced += [0] * len(rows)
        self.metrics.set("ia3_active_rows", len(self.rows))

    def pick(self) -> list[int]:
        """Each row's next token (pushed to its queue); rows that stop leave the batch. Returns the kept rows'
        tokens, in row order."""
        greedy = self.logits.argmax(-1).tolist()  # one device sync for every greedy row
        keep: list[int] = []
        tokens: list[int] = []
        for j, row in enumerate(self.rows):
            if row.cancelled:
                self.metrics.inc("ia3_rows_cancelled_total")
                row.emit("done", "cancelled")
                continue
            token = greedy[j] if row.temperature == 0 else _pick(self.logits[j], row, self.generators[j])
            if token in self.eos and not row.ignore_eos:
                row.emit("done", "stop")
                continue
            row.emit("token", token)
            self.produced[j] += 1
            self.metrics.inc("ia3_tokens_generated_total")
            if self.produced[j] >= row.max_tokens:
                row.emit("done", "length")
                continue
            keep.append(j)
            tokens.append(token)
        if len(keep) < len(self.rows):
            self._keep(keep)
        return tokens

    def _keep(self, keep: list[int]) -> None:
        import torch

        self.rows = [self.rows[j] for j in keep]
        self.generators = [self.generators[j] for j in keep]
        self.produced = [self.produced[j] for j in keep]
        self.metrics.set("ia3_active_rows", len(self.rows))
        if not keep:
            self.cache = self.mask = self.last_pos = self.logits = None
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last_pos = self.mask[index], self.last_pos[index]
        unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns no row attends to
        if unused and self.joinable:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]

    def step(self, tokens: list[int]) -> None:
        """One decoding step: each row's ``tokens`` entry through the model, with the cache."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.last_pos = self.last_pos + 1
        with torch.inference_mode(), self.mixed.select([r.adapter for r in self.rows]):
            out = self.mixed.model(
                input_ids=torch.tensor(tokens, device=self.device).unsqueeze(1),
                attention_mask=self.mask,
                position_ids=self.last_pos.unsqueeze(1),
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]


def _joinable(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def generate(
    mixed: MixedIA3,
    rows: list[Row],
    metrics: Metrics,
    admit: Callable[[list[Row]], list[Row]] | None = None,
) -> None:
    """Generate every row of a mixed-adapter batch, one token per row per step, pushing tokens as they come.

    Rows stop at EOS (unless ``ignore_eos``), at ``max_tokens``, or when cancelled. Between steps,
    ``admit(running_rows)`` returns rows that join the batch (prefilled, then decoded with the others); the loop
    ends when no row is left and ``admit`` has none. ``admit=None`` generates just ``rows``.
    """
    batch = Running(mixed, metrics)
    new = rows
    try:
        while True:
            if new:
                batch.join(new)
            tokens = batch.pick()
            new = admit(batch.rows) if admit is not None and (batch.joinable or not batch.rows) else []
            if not batch.rows:
                if not new:
                    break
                continue
            batch.step(tokens)
    finally:
        metrics.set("ia3_active_rows", 0)
