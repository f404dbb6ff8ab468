"""The step budget: how many optimiser steps a recipe trains for, and when that is too few for IA3.

One rule, counted as the Trainer counts (the last partial batch and the last partial accumulation each count), for
``ia3 train``'s pre-flight warning and for the budget ``ia3 compare`` gives every method. No torch here.
"""

from __future__ import annotations

import math

from ia3cli.config.recipe import TrainingSection

MIN_STEPS = 50  # fewer optimiser steps than this barely move IA3 vectors from 1 (T-Few trains 1000 at batch 8)


def optimizer_steps(training: TrainingSection, train_rows: int, world_size: int = 1) -> int:
    """Optimiser steps the recipe's budget gives: ``max_steps``, else epochs x updates per epoch (as the Trainer
    counts them: the last partial batch and the last partial accumulation each count)."""
    if training.max_steps:
        return training.max_steps
    batches = math.ceil(train_rows / (training.batch_size * world_size))
    per_epoch = max(math.ceil(batches / training.gradient_accumulation_steps), 1)
    return math.ceil(training.epochs * per_epoch)


def budget_warning(training: TrainingSection, train_rows: int) -> str | None:
    """A warning when the budget gives fewer than ``MIN_STEPS`` optimiser steps, else ``None``."""
    steps = optimizer_steps(training, train_rows)
    if steps >= MIN_STEPS:
        return None
    if training.max_steps:
        return (
            f"training.max_steps: {steps} optimiser steps barely move IA3 vectors (fewer than {MIN_STEPS}); "
            "raise it (T-Few trains 1000 steps at batch 8 whatever the number of rows)"
        )
    return (
        f"training.epochs: {train_rows} rows at batch {training.batch_size} x accumulation "
        f"{training.gradient_accumulation_steps} for {training.epochs:g} epochs give only {steps} optimiser steps; "
        f"IA3 vectors barely move in fewer than {MIN_STEPS}. Set training.max_steps (e.g. 200): small data is then "
        "cycled over as many epochs as it takes"
    )


def compare_budget(training: TrainingSection, train_rows: int) -> int:
    """The steps every method of ``ia3 compare`` gets at ``train_rows`` rows: the recipe's ``max_steps``, else its
    epochs counted by :func:`optimizer_steps` but never fewer than :data:`MIN_STEPS`, so that small N still trains."""
    if training.max_steps:
        return training.max_steps
    return max(MIN_STEPS, optimizer_steps(training, train_rows))
