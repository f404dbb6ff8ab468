"""Did training help: the step-0 baseline, what training gained over it, and the outcome findings.

- ``TrainingArguments.eval_on_start`` (``training.eval_on_start``) evaluates the untouched model before the first
  optimiser step, on the same rows and with the same metric as every later evaluation; the Trainer keeps that
  evaluation in ``state.log_history``, so a resumed run (which skips it) still has it. :func:`baseline_metrics`
  reads it back for ``metrics.json`` (``baseline_<metric>``).
- Iterating a ``DataLoader`` without a generator draws its base seed from the global torch RNG
  (``_BaseDataLoaderIter`` in torch 2.x), so that evaluation would move the RNG that dropout and the training
  sampler draw from next, and the same recipe would train a different adapter with and without it.
  :class:`KeepRngAcrossStep0` puts the RNG states back once it is over: both train the same adapter.
- :func:`findings` applies the outcome rules of :data:`ia3cli.training.health.FINDINGS` (``no_gain_over_base``,
  ``below_majority_class``) to a finished run's evaluations; :func:`record` adds them to the monitor's findings and
  ``health.json``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ia3cli.training import health

_COMPARE_METHODS = {"seq-cls": "ia3,head,full", "seq2seq": "zero-shot,ia3,lora", "causal-lm": "zero-shot,icl,ia3,lora"}

_HIDDEN_EVAL = ("_runtime", "_per_second")


def baseline_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """The step-0 evaluation of a run (the untouched model): ``{"accuracy": ..., "loss": ...}``, ``{}`` if none.

    Args:
        history: The Trainer's ``state.log_history`` (kept in checkpoints, so a resumed run still has it).
    """
    for record in history:
        if record.get("step") == 0 and any(k.startswith("eval_") for k in record):
            return {
                k.removeprefix("eval_"): float(v)
                for k, v in record.items()
                if k.startswith("eval_") and isinstance(v, (int, float)) and not k.endswith(_HIDDEN_EVAL)
            }
    return {}


def findings(
    history: list[dict[str, Any]],
    rows: int,
    majority: float | None,
    *,
    steps: int,
    learning_rate: float,
    task: str,
) -> list[dict[str, Any]]:
    """The outcome findings of a finished run: ``no_gain_over_base`` and ``below_majority_class``.

    The best accuracy is the highest ``eval_accuracy`` logged after step 0 (every evaluation during training and
    the final one). Without a step-0 evaluation (``training.eval_on_start: false``) only the majority rule applies;
    without an accuracy (tasks that are not classification or choice) neither does.

    Args:
        history: The Trainer's ``state.log_history``, final evaluation included.
        rows: Evaluation rows (the ``n`` of the standard error).
        majority: The majority-class rate of those rows (:func:`ia3cli.scoring.chance.majority_rate`).
        steps: Optimiser steps run; learning_rate: the recipe's; task: the recipe's (named in the hint).

    Returns:
        Findings as in ``health.json``: ``{"code", "step", "group": None, "message"}``.
    """
    from ia3cli.scoring.chance import gain_noise
    from ia3cli.training.budget import MIN_STEPS

    trained = [r["eval_accuracy"] for r in history if r.get("step", 0) > 0 and _finite(r.get("eval_accuracy"))]
    if not trained or rows <= 0:
        return []
    best, base = max(trained), baseline_metrics(history).get("accuracy")
    facts = {"best": best, "base": base, "majority": majority, "rows": rows, "steps": steps, "lr": learning_rate}
    facts.update(more=max(4 * steps, 4 * MIN_STEPS), methods=_COMPARE_METHODS.get(task, "ia3"))
    margins = {}
    if base is not None:
        facts.update(gain=best - base, noise=gain_noise(base, best, rows))
        margins["no_gain_over_base"] = facts["gain"] - facts["noise"]
    if majority is not None and best < 1.0:  # a perfect accuracy has nothing left to beat (one-class rows)
        margins["below_majority_class"] = best - majority
    found = []
    for code, margin in margins.items():
        rule = health.FINDINGS[code]
        if rule.condition(margin, None):
            text = f"{rule.what.format(**facts)}. likely cause: {rule.cause[0].format(**facts)}. fix: "
            found.append({"code": code, "step": steps, "group": None, "message": text + rule.fix[0].format(**facts)})
    return found


def gain_line(metrics: dict[str, Any], metric: str) -> str:
    """``baseline: accuracy 0.5000 at step 0 -> 0.8500 (+0.3500) | majority class 0.5000`` (the parts known)."""
    base, final, majority = (metrics.get(k) for k in (f"baseline_{metric}", f"eval_{metric}", "majority_accuracy"))
    parts = []
    if _finite(base) and _finite(final):
        parts.append(f"baseline: {metric} {base:.4f} at step 0 -> {final:.4f} ({final - base:+.4f})")
    if _finite(majority):
        parts.append(f"majority class {majority:.4f}")
    return " | ".join(parts)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def record(
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    rows: int,
    monitor: Any,
    recipe: Any,
    say: Callable[[str], None],
    health_json: Path | None,
) -> None:
    """Judge a finished IA3 run: print each outcome finding, add it to the monitor's and rewrite ``health.json``.

    Args:
        history: ``state.log_history`` plus the final evaluation; metrics: ``metrics.json``'s content; rows: the
            evaluation rows; monitor: the run's ``GradNormMonitor``; recipe: the run's; say: the console's printer;
            health_json: where ``health.json`` goes (``None`` on the processes that write nothing).
    """
    t = recipe.training
    found = findings(
        history,
        rows,
        metrics.get("majority_accuracy"),
        steps=metrics["global_step"],
        learning_rate=t.learning_rate,
        task=recipe.model.task,
    )
    for finding in found:
        say(f"warning: {finding['code']}: {finding['message']}")
    monitor.findings.extend(found)
    if found and health_json is not None:
        health.write(health_json, monitor.health)


def rng_states() -> dict[str, Any]:
    """Python's, NumPy's, torch's CPU and (where present) CUDA generators' states."""
    import numpy as np
    import torch

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` saved."""
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


class KeepRngAcrossStep0(TrainerCallback):
    """Saves the RNG states when a fresh run begins with a step-0 evaluation and restores them when it ends.

    The Trainer (transformers 5) calls ``on_train_begin``, then the step-0 ``evaluate`` (whose last act is
    ``on_evaluate``), then starts the first epoch; nothing else draws in between.
    """

    def __init__(self) -> None:
        self._saved: dict[str, Any] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._saved = rng_states() if args.eval_on_start and state.global_step == 0 else None

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._saved is not None and state.global_step == 0:
            set_rng_states(self._saved)
            self._saved = None
