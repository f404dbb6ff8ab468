"""Metrics: accuracy and macro-F1, loss and perplexity, exact match, and rank classification.

What ``ia3 eval`` (:mod:`ia3cli.scoring.eval_command`) and training report, per task:

- ``seq-cls``: accuracy, macro-F1 and loss of the classification head.
- ``causal-lm``: loss (mean negative log-likelihood per target token) and perplexity (``exp(loss)``); with
  ``data.label_names``, rank classification as in the IA3 paper: every verbaliser is scored by the mean
  log-probability of its tokens after the prompt (built exactly as training builds targets) and the best one wins.
- ``seq2seq``: loss and perplexity, exact match of greedy generation (stripped, lower-cased), and rank
  classification with the verbalisers as decoder targets.

Batches are padded dynamically (right padding) and run under ``torch.inference_mode()``. Heavy libraries are
imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ia3cli.models.device import input_device
from ia3cli.scoring.loglik import length_batches, mean_logprobs, pad_batch, pad_id, sequence_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ia3cli.config.recipe import Recipe


Progress = Callable[[str, int, int], None]
"""Optional progress callback: ``progress(stage, rows_done_now, stage_total)``; stages ``loss``, ``classify``,
``generate`` and ``rank`` (rows x verbalisers). The CLI passes ``Console.stages()``; library callers pass nothing."""


def _stage(progress: Progress | None, name: str, total: int) -> Callable[[int], None] | None:
    return None if progress is None else (lambda n: progress(name, n, total))


def classification_metrics(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (classes absent from both preds and labels are left out of the mean)."""
    pairs = list(zip(preds, labels, strict=True))
    if not pairs:
        return {"accuracy": 0.0, "f1": 0.0}
    accuracy = sum(p == y for p, y in pairs) / len(pairs)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and y == c for p, y in pairs)
        fp = sum(p == c and y != c for p, y in pairs)
        fn = sum(p != c and y == c for p, y in pairs)
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "f1": sum(f1s) / len(f1s) if f1s else 0.0}


def trainer_metrics(num_labels: int) -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for the Trainer on a classification head (argmax of the logits)."""

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        return classification_metrics(logits.argmax(-1).tolist(), labels.tolist(), num_labels)

    return compute


# --- batching and scoring -----------------------------------------------------------------------------------------


def choice_features(
    row: dict[str, Any], recipe: Recipe, tokenizer: PreTrainedTokenizerBase, template: str | None = None
) -> list[dict[str, Any]]:
    """One encoded sequence per choice of the row (``label_names`` or the row's ``choices_column``), built exactly
    as training builds targets; ``template`` replaces the evaluation prompt template."""
    from ia3cli.data.encoding import encode_target, prompt_text, row_choices

    d = recipe.data
    prompt = prompt_text(row, d, template)
    return [encode_target(tokenizer, recipe.model.task, prompt, c, d.max_length) for c in row_choices(row, d)]


def score_choices(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 16,
    advance: Callable[[int], None] | None = None,
    share_prefix: bool = False,
) -> list[list[float]]:
    """Length-normalised log-likelihood of every choice for every row: ``scores[row][choice]``.

    The score is the mean log-probability of the choice's target tokens (for causal LMs the joined choice plus EOS,
    as trained) given the prompt. Rows with per-row choices may have different numbers of them. ``share_prefix``:
    see :func:`sequence_logprobs`.
    """
    per_row = [choice_features(row, recipe, tokenizer) for row in rows]
    flat = [f for feats in per_row for f in feats]
    means = mean_logprobs(model, flat, pad_id(tokenizer), batch_size, advance, share_prefix)
    out, start = [], 0
    for feats in per_row:
        out.append(means[start : start + len(feats)])
        start += len(feats)
    return out


def rank_classify(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 16,
    progress: Progress | None = None,
    share_prefix: bool = False,
) -> dict[str, float]:
    """Rank classification (the IA3 paper's evaluation): pick the best-scored verbaliser; accuracy and macro-F1.

    The model is put in eval mode and restored afterwards. ``share_prefix``: run the prompts' common start (the
    demonstrations of in-context learning) once; see :func:`sequence_logprobs`.
    """
    import torch

    from ia3cli.data.encoding import choice_label, row_choices

    d = recipe.data
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            advance = _stage(progress, "rank", sum(len(row_choices(row, d)) for row in rows))
            scores = score_choices(model, tokenizer, recipe, rows, batch_size, advance, share_prefix)
    finally:
        model.train(was_training)
    preds = [max(range(len(s)), key=lambda c, s=s: s[c]) for s in scores]
    labels = [choice_label(row, d) for row in rows]
    return classification_metrics(preds, labels, max((len(s) for s in scores), default=0))


def choice_trainer_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for choice batches: predictions are ``(rows, choices)`` scores, label ids are
    ``(rows, 2)`` pairs of (correct choice, number of choices); padded choices never win."""
    import numpy as np

    scores, pairs = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
    counts = pairs[:, 1]
    masked = np.where(np.arange(scores.shape[1])[None, :] < counts[:, None], scores, -np.inf)
    return classification_metrics(masked.argmax(-1).tolist(), pairs[:, 0].tolist(), int(counts.max()))


def _batch_size(recipe: Recipe) -> int:
    return recipe.training.eval_batch_size or 2 * recipe.training.batch_size


def after_training(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    rows: Sequence[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Rank-classification metrics on the eval split for ``metrics.json`` (``eval_accuracy``, ``eval_f1``).

    ``rows`` are the eval split's raw rows when the caller has them already; otherwise the split is loaded.
    Returns ``{}`` for ``seq-cls`` (the Trainer reports those) and when there is no eval split or no
    ``data.label_names``.
    """
    d = recipe.data
    if not recipe.has_choices or d.eval_split is None:
        return {}
    if rows is None:
        from ia3cli.data.sources import load_split, sample

        rows = list(sample(load_split(d, d.eval_split), d.eval_samples, recipe.training.seed))
    metrics = rank_classify(model, tokenizer, recipe, rows, _batch_size(recipe))
    return {f"eval_{k}": v for k, v in metrics.items()}


# --- the metrics of one split -------------------------------------------------------------------------------------


def _classification_head(
    model: PreTrainedModel,
    features: list[dict[str, Any]],
    pad_token_id: int,
    batch_size: int,
    num_labels: int,
    advance: Callable[[int], None] | None = None,
) -> dict[str, float]:
    import torch

    device = input_device(model)
    preds = [0] * len(features)
    total_loss = 0.0
    for idx in length_batches(len(features), [len(f["input_ids"]) for f in features], batch_size):
        batch = {k: v.to(device) for k, v in pad_batch([features[i] for i in idx], pad_token_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        total_loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        for j, p in zip(idx, logits.argmax(-1).tolist(), strict=True):
            preds[j] = p
        if advance is not None:
            advance(len(idx))
    labels = [f["labels"] for f in features]
    return {**classification_metrics(preds, labels, num_labels), "loss": total_loss / max(len(features), 1)}


def _exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    recipe: Recipe,
    advance: Callable[[int], None] | None = None,
) -> float:
    """Share of rows whose greedy generation equals the target after strip() and lower()."""
    from ia3cli.data.encoding import prompt_text, target_text

    d, device, batch_size = recipe.data, input_device(model), _batch_size(recipe)
    hits = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        feats = [dict(tokenizer(prompt_text(r, d), truncation=True, max_length=d.max_length)) for r in chunk]
        targets = [target_text(r, d, recipe.num_labels) for r in chunk]
        longest = max(len(tokenizer(text_target=t)["input_ids"]) for t in targets)
        batch = {k: v.to(device) for k, v in pad_batch(feats, pad_id(tokenizer)).items()}
        generated = model.generate(**batch, max_new_tokens=min(longest + 2, d.max_length), do_sample=False, num_beams=1)
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        hits += sum(g.strip().lower() == t.strip().lower() for g, t in zip(texts, targets, strict=True))
        if advance is not None:
            advance(len(chunk))
    return hits / max(len(rows), 1)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    rows: list[dict[str, Any]],
    progress: Progress | None = None,
) -> dict[str, float]:
    """All metrics of the recipe's task on ``rows`` (raw dataset rows); the model is put in eval mode.

    Args:
        progress: Called as batches finish (see :data:`Progress`).
    """
    import torch

    from ia3cli.data.encoding import encode_row

    task, batch_size, pad = recipe.model.task, _batch_size(recipe), pad_id(tokenizer)
    features = [encode_row(row, recipe, tokenizer, index=i) for i, row in enumerate(rows, 1)]
    model.eval()
    metrics: dict[str, float] = {}
    with torch.inference_mode():
        if task == "seq-cls":
            advance = _stage(progress, "classify", len(features))
            return _classification_head(model, features, pad, batch_size, recipe.num_labels, advance)
        scored = sequence_logprobs(model, features, pad, batch_size, _stage(progress, "loss", len(features)))
        tokens = sum(c for _, c in scored)
        metrics["loss"] = -sum(s for s, _ in scored) / max(tokens, 1)
        metrics["perplexity"] = math.exp(metrics["loss"]) if metrics["loss"] < 700 else math.inf
        metrics["target_tokens"] = tokens
        if task == "seq2seq" and recipe.data.messages_column is None:
            metrics["exact_match"] = _exact_match(
                model, tokenizer, rows, recipe, _stage(progress, "generate", len(rows))
            )
    if recipe.has_choices:
        metrics.update(rank_classify(model, tokenizer, recipe, rows, batch_size, progress))
    return metrics
