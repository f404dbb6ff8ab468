"""What an accuracy has to beat: the majority-class rate of the evaluated rows, and the binomial noise of a gain.

An accuracy measured on ``n`` rows is a binomial proportion: its standard error is ``sqrt(p (1 - p) / n)``. The
gain of a trained model over a reference (the step-0 baseline, zero-shot) is the difference of two such accuracies
on the same ``n`` rows, and :func:`gain_noise` is the standard error of that difference, counting both as
independent estimates: ``sqrt((p0 (1 - p0) + p1 (1 - p1)) / n)``. A gain counts (:func:`beats`) only when it is
larger than that: one standard error. Two choices, both deliberate:

- Independence overstates the noise of a paired comparison (both models answer the same rows), while reporting the
  best of several evaluations understates it; the two errors pull in opposite directions.
- One standard error, not two: on the 32 to 100 evaluation rows of a few-shot run, two would call a real gain of
  0.1 noise. A gain below one standard error is one the rows cannot tell from chance.

Nothing here imports torch; the row labels come from :mod:`ia3cli.data.encoding`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ia3cli.config.recipe import Recipe


def row_labels(rows: Iterable[dict[str, Any]], recipe: Recipe) -> list[int] | None:
    """The class id of each row (seq-cls) or the index of its correct choice (choice tasks); ``None`` for tasks
    without classes (plain generation, chat)."""
    from ia3cli.data.encoding import choice_label, label_id

    d = recipe.data
    if recipe.model.task == "seq-cls":
        return [label_id(row[d.label_column], d, recipe.num_labels) for row in rows]
    if recipe.has_choices:
        return [choice_label(row, d) for row in rows]
    return None


def majority_rate(labels: Sequence[Any] | None) -> float | None:
    """The accuracy of always answering the most frequent label of ``labels`` (``None`` when there are none)."""
    if not labels:
        return None
    return Counter(labels).most_common(1)[0][1] / len(labels)


def majority_of(rows: Iterable[dict[str, Any]], recipe: Recipe) -> float | None:
    """:func:`majority_rate` of the rows' labels (``None`` for tasks without classes)."""
    return majority_rate(row_labels(rows, recipe))


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` rows: ``sqrt(p (1 - p) / n)``."""
    if n <= 0:
        return math.inf
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / n)


def gain_noise(reference: float, value: float, n: int) -> float:
    """Standard error of ``value - reference``, two accuracies on the same ``n`` rows taken as independent."""
    return math.hypot(standard_error(reference, n), standard_error(value, n))


def beats(value: float, reference: float, n: int) -> bool:
    """Whether accuracy ``value`` is better than ``reference`` by more than :func:`gain_noise` (see the module)."""
    return value - reference > gain_noise(reference, value, n)
