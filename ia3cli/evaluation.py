"""Metrics: accuracy and macro-F1 for classification."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


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
