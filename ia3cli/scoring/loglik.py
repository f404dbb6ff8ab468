"""Padded batches and the log-likelihood of each target sequence: what rank classification, the loss and the
merge probe run their forward passes through.

Right padding, batches of similar length, and (``share_prefix``) a prompt start common to every sequence run once
with its key/value cache reused. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from ia3cli.data.encoding import IGNORE_INDEX
from ia3cli.models.device import input_device

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def pad_batch(features: list[dict[str, Any]], pad_token_id: int, *, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad a list of encoded rows to their longest row, on the right (``left``: on the left, as decoder-only
    generation wants); ``labels`` are padded with -100, ``attention_mask`` with 0, scalar labels are stacked."""
    import torch

    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if not isinstance(values[0], list):
            batch[key] = torch.tensor(values)
            continue
        fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
        width = max(len(v) for v in values)
        pads = [[fill] * (width - len(v)) for v in values]
        batch[key] = torch.tensor([p + list(v) if left else list(v) + p for v, p in zip(values, pads, strict=True)])
    return batch


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else 0 (positions that are padding are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def length_batches(n: int, lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (less padding); results are put back in row order by the caller."""
    order = sorted(range(n), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def shared_prefix_length(features: Sequence[dict[str, Any]]) -> int:
    """How many leading tokens every causal sequence shares and none of them scores.

    Capped one token before each sequence's first target, so the logits that predict every target token are
    still computed after the prefix.
    """
    if not features:
        return 0
    first = features[0]["input_ids"]
    n = len(first)
    for f in features:
        ids = f["input_ids"]
        same = next((i for i, (a, b) in enumerate(zip(ids[:n], first[:n], strict=False)) if a != b), min(n, len(ids)))
        target = next((i for i, label in enumerate(f["labels"]) if label != IGNORE_INDEX), len(ids))
        n = min(same, target - 1)
    return max(n, 0)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token and the mask of target tokens, both ``(N, T)``.

    Every log-likelihood ia3cli computes (rank classification, the T-Few loss, ``ia3 predict``, ``ia3 serve``)
    goes through this function.

    Args:
        logits: ``(N, T, vocab)`` model outputs.
        labels: ``(N, T)`` token ids, -100 where there is no target.
        shift: True for decoder-only models (token ``t`` is predicted at ``t - 1``); False when the logits are
            aligned with the labels already (encoder-decoder).
    """
    logits = logits.float()
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    # log p = logit - logsumexp: one (N, T, vocab) tensor fewer than log_softmax
    logp = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return logp * mask, mask


def sequence_logprobs(
    model: PreTrainedModel,
    features: list[dict[str, Any]],
    pad_token_id: int,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
    share_prefix: bool = False,
    select: Callable[[list[int]], AbstractContextManager[Any]] | None = None,
) -> list[tuple[float, int]]:
    """Sum of target-token log-probabilities and the number of target tokens, for each encoded sequence.

    Target tokens are those whose ``labels`` entry is not -100. Decoder-only models predict token ``t`` from the
    logits at ``t - 1``; encoder-decoder models' logits are already aligned with ``labels``. ``advance(n)`` is
    called after each batch of ``n`` sequences.

    ``share_prefix`` (decoder-only models): the tokens every sequence starts with (in-context demonstrations) run
    once, and each batch continues from a copy of their key/value cache; the scores are those of the full
    sequences, up to float rounding. Only for a model that treats every row alike (not per-row adapters).

    ``select(indices)``: a context entered around each batch's forward with the indices of its sequences, as
    :meth:`ia3cli.tuners.mixed.MixedIA3.select` needs to give each row its own adapter.
    """
    import copy

    import torch

    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    device = input_device(model)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(features)
    shared = shared_prefix_length(features) if share_prefix and not seq2seq else 0
    cache = None
    if shared:
        prefix = torch.tensor([features[0]["input_ids"][:shared]], device=device)
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        features = [{k: v[shared:] if isinstance(v, list) else v for k, v in f.items()} for f in features]
    lengths = [len(f["input_ids"]) + len(f["labels"]) for f in features]
    for idx in length_batches(len(features), lengths, batch_size):
        batch = {k: v.to(device) for k, v in pad_batch([features[i] for i in idx], pad_token_id).items()}
        labels = batch["labels"] if seq2seq else batch.pop("labels")
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(idx))
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
            batch["attention_mask"] = torch.cat([mask.new_ones(len(idx), shared), mask], dim=1)
            batch["past_key_values"] = past
        with select(idx) if select is not None else nullcontext():
            logits = model(**batch).logits
        logp, mask = token_logprobs(logits, labels, shift=not seq2seq)
        sums = logp.sum(-1).tolist()
        counts = mask.sum(-1).tolist()
        for j, i in enumerate(idx):
            out[i] = (sums[j], counts[j])
        if advance is not None:
            advance(len(idx))
    return out


def mean_logprobs(*args: Any, **kwargs: Any) -> list[float]:
    """Each sequence's mean target-token log-probability: the length-normalised score rank classification ranks
    choices by (``ia3 eval``, ``ia3 predict``, ``ia3 serve``). Arguments as :func:`sequence_logprobs`."""
    return [total / max(count, 1) for total, count in sequence_logprobs(*args, **kwargs)]
