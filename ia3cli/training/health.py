"""Training-health rules for IA3 vectors, as plain data and pure functions: the :data:`FINDINGS` table, the streak
bookkeeping that fires them, and ``health.json``.

Nothing here touches torch or a Trainer: :class:`Checks` takes per-group numbers (gradient norms before clipping,
drift from initialisation) one health check at a time and returns the findings that fire, so tests drive every rule
with plain floats. The Trainer callback that measures those numbers is :mod:`ia3cli.training.monitor`.

Findings (each reported once, with its likely cause and fix):

- ``vanishing_gradients``: a group's norm below ``monitor.vanishing_below`` for ``patience`` consecutive checks;
- ``exploding_gradients``: a group's pre-clip norm above ``monitor.exploding_above`` for ``patience`` checks;
- ``vectors_not_moving``: a group's drift (mean ``|l - 1|``) below 1e-6 for ``patience`` checks (the first check is
  skipped: before any step nothing has moved);
- ``nonfinite_loss``: a non-finite loss, IA3 gradient or vector at any step; training stops at once.

Two more read the evaluations instead (:func:`ia3cli.training.outcome.findings`, once training is over, for tasks
with an accuracy):

- ``no_gain_over_base``: the best accuracy evaluated after step 0 is not above the step-0 baseline (the untouched
  model, evaluated before the first optimiser step on the same rows) by more than one standard error of the gain,
  ``sqrt((p0 (1 - p0) + p1 (1 - p1)) / n)`` on the ``n`` evaluation rows (:mod:`ia3cli.scoring.chance` says why);
- ``below_majority_class``: the best accuracy is at or below the rate of always answering the evaluated rows' most
  frequent label (unless it is 1.0: when every row has the same label, learning it is all there is to learn).

When every group fires the same rule at once (and there is more than one group), one finding names "all groups":
the learning rate or the data, not the targets, is then the likely cause.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia3cli.config.families import GROUPS
from ia3cli.outputs import write_atomic

if TYPE_CHECKING:
    from ia3cli.config.recipe import MonitorSection

__all__ = ["FINDINGS", "GROUPS", "NOT_MOVING_BELOW", "Checks", "Rule"]

NOT_MOVING_BELOW = 1e-6
"""A group whose mean |l - 1| stays below this has not moved."""


@dataclass(frozen=True)
class Rule:
    """One health finding.

    Args:
        code: The finding's code in ``health.json``.
        measure: The per-group number the condition reads: ``grad_norm`` (pre-clip) or ``drift`` (mean ``|l - 1|``);
            ``any`` for ``nonfinite_loss``, which reads the loss, every gradient and every vector; ``accuracy`` for
            the outcome rules, whose value is the best accuracy's margin over the reference (the noise deducted).
        condition: ``(value, cfg) -> bad``; a rule fires after ``cfg.patience`` consecutive bad checks.
        from_check: The first check (1-based) the condition applies to; earlier checks count as good.
        what: What was seen; a template over ``where``, ``shown``, ``cfg``, ``step``.
        cause: Likely cause for all groups at once, and for one ``{group}``.
        fix: The fix for all groups at once, and for one ``{group}``; ``{clip}`` names the clipping setting.
    """

    code: str
    measure: str
    condition: Callable[[float, MonitorSection], bool]
    from_check: int
    what: str
    cause: tuple[str, str]
    fix: tuple[str, str]


_TARGETS_FIX = (
    "run `ia3 inspect-modules` and check adapter.target_modules (and that feedforward_modules is a subset naming "
    "the FFN down-projection); try model.quantization: 8bit or none"
)
_LR_FIX = (
    "lower training.learning_rate (IA3 usually 1e-3..5e-3), keep training.max_grad_norm: 1.0, and check that "
    "feedforward_modules is a subset of target_modules"
)
_EXPLODING_CAUSE = (
    "the learning rate is too high for IA3, or feedforward_modules names a module that is not the FFN "
    "down-projection; {clip}"
)

_OUTCOME_CAUSE = (
    "in order of likelihood: (1) too few optimiser steps ({steps} run); (2) a learning rate too low or too high "
    "({lr:g}); (3) label words or a template the base does not connect to the task; (4) a base too small for it"
)
_OUTCOME_FIX = (
    "(1) `ia3 train RECIPE --set training.max_steps={more} --overwrite`; (2) `--set training.learning_rate=...` "
    "(IA3 usually 1e-3..1e-2); (3) check data.label_names and data.prompt_template; (4) `ia3 compare RECIPE "
    "--methods {methods} --rows 32` shows what the untouched base and other methods reach on these rows: if none "
    "beats the majority class, choose a larger model.name"
)

FINDINGS: dict[str, Rule] = {
    rule.code: rule
    for rule in (
        Rule(
            "vanishing_gradients",
            "grad_norm",
            lambda value, cfg: value < cfg.vanishing_below,
            1,
            "gradient norm of {where} below {cfg.vanishing_below:g} for {cfg.patience} checks ({shown})",
            (
                "the loss barely depends on the adapter: labels masked out, or an over-quantised (4-bit) base",
                "the '{group}' targets are wrong or sit downstream of where the signal enters",
            ),
            (_TARGETS_FIX, _TARGETS_FIX),
        ),
        Rule(
            "exploding_gradients",
            "grad_norm",
            lambda value, cfg: value > cfg.exploding_above,
            1,
            "pre-clip gradient norm of {where} above {cfg.exploding_above:g} for {cfg.patience} checks ({shown})",
            (_EXPLODING_CAUSE, _EXPLODING_CAUSE),
            (_LR_FIX, _LR_FIX),
        ),
        Rule(
            "vectors_not_moving",
            "drift",
            lambda value, cfg: value < NOT_MOVING_BELOW,
            2,
            "IA3 vectors of {where} have not left 1.0 after {step} steps (mean |l-1| {shown})",
            (
                "the learning rate is far too low (IA3 needs 1e-3..5e-3, about 10x LoRA's)",
                "the '{group}' vectors get no useful gradient (wrong or downstream targets)",
            ),
            (
                "set training.learning_rate: 3e-3",
                "run `ia3 inspect-modules` and check adapter.target_modules / feedforward_modules",
            ),
        ),
        Rule(
            "nonfinite_loss",
            "any",
            lambda value, cfg: not math.isfinite(value),
            1,
            "loss or gradient is not finite at step {step}{where}; training stopped and no checkpoint was saved from "
            "this state (last good checkpoint: {good})",
            (
                "a learning rate too high for IA3, fp16 overflow, clipping disabled, or a bad input row",
                "a learning rate too high for IA3, fp16 overflow, clipping disabled, or a bad input row",
            ),
            (
                "lower training.learning_rate (IA3 usually 1e-3..5e-3), use model.dtype bfloat16 or float32, keep "
                "training.max_grad_norm: 1.0, then resume from the last checkpoint with --resume",
            )
            * 2,
        ),
        Rule(
            "no_gain_over_base",
            "accuracy",
            lambda margin, cfg: margin <= 0,
            1,
            "best accuracy {best:.3f} is not above the step-0 baseline {base:.3f} by more than its noise (gain "
            "{gain:+.3f}, one standard error {noise:.3f} on {rows} rows)",
            (_OUTCOME_CAUSE, _OUTCOME_CAUSE),
            (_OUTCOME_FIX, _OUTCOME_FIX),
        ),
        Rule(
            "below_majority_class",
            "accuracy",
            lambda margin, cfg: margin <= 0,
            1,
            "best accuracy {best:.3f} is at or below {majority:.3f}, the accuracy of always answering the most "
            "frequent label of the {rows} evaluation rows",
            (_OUTCOME_CAUSE, _OUTCOME_CAUSE),
            (_OUTCOME_FIX, _OUTCOME_FIX),
        ),
    )
}
"""Every health finding: code -> (measure, condition, cause, fix)."""

STREAK_RULES = tuple(rule for rule in FINDINGS.values() if rule.measure in ("grad_norm", "drift"))


def fmt(values: dict[str, float]) -> str:
    """``k 1.2e-02 v 3.4e-03``: per-group values for a printed line."""
    return " ".join(f"{g} {v:.1e}" for g, v in values.items())


def _clip(max_grad_norm: float | None) -> str:
    return f"clipping at {max_grad_norm:g}" if max_grad_norm is not None else "clipping is disabled"


def message(rule: Rule, *, step: int, group: str | None, shown: str, cfg: Any, max_grad_norm: float | None) -> str:
    """The finding's sentence: what was seen, likely cause, fix."""
    where = "all groups" if group is None else f"the '{group}' vectors"
    which = 0 if group is None else 1
    what = rule.what.format(where=where, shown=shown, cfg=cfg, step=step)
    cause = rule.cause[which].format(group=group, clip=_clip(max_grad_norm))
    fix = rule.fix[which].format(group=group)
    return f"{what}. likely cause: {cause}. fix: {fix}"


def nonfinite(step: int, groups: list[str], last_good: str | None) -> dict[str, Any]:
    """The ``nonfinite_loss`` finding for ``step`` (``groups``: those with a non-finite value, if known)."""
    rule = FINDINGS["nonfinite_loss"]
    where = f" (groups: {', '.join(groups)})" if groups else ""
    what = rule.what.format(step=step, where=where, good=last_good or "none saved yet")
    text = f"{what}. likely cause: {rule.cause[0]}. fix: {rule.fix[0]}"
    return {"code": rule.code, "step": step, "group": None, "message": text}


class Checks:
    """Streaks of bad checks per (rule, group); fires each finding once.

    Args:
        cfg: The recipe's ``monitor`` section (thresholds, ``patience``).
        max_grad_norm: The recipe's ``training.max_grad_norm`` (named in the exploding-gradient cause).
        groups: The groups being watched, in display order.
    """

    def __init__(self, cfg: MonitorSection, max_grad_norm: float | None, groups: list[str]) -> None:
        self.cfg = cfg
        self.max_grad_norm = max_grad_norm
        self.groups = list(groups)
        self.checks = 0
        self.streaks: dict[tuple[str, str], int] = {}
        self.reported: set[tuple[str, str]] = set()

    def update(self, step: int, grad_norm: dict[str, float] | None, drift: dict[str, float]) -> list[dict[str, Any]]:
        """One health check: extend the streaks and return the findings that fire now.

        Args:
            step: The optimiser step of the check.
            grad_norm: Pre-clip gradient norm per group (``None`` when not measured: gradient rules are skipped).
            drift: Mean ``|l - 1|`` per group.

        Returns:
            New findings: ``{"code", "step", "group", "message"}``, ``group`` ``None`` when every group fired.
        """
        self.checks += 1
        measured = {"grad_norm": grad_norm, "drift": drift}
        fired: dict[str, list[str]] = {}
        for group in self.groups:
            for rule in STREAK_RULES:
                values = measured[rule.measure]
                if values is None:
                    continue
                bad = self.checks >= rule.from_check and rule.condition(values[group], self.cfg)
                key = (rule.code, group)
                streak = self.streaks[key] = self.streaks.get(key, 0) + 1 if bad else 0
                if streak >= self.cfg.patience and key not in self.reported:
                    self.reported.add(key)
                    fired.setdefault(rule.code, []).append(group)
        findings = []
        for code, groups in fired.items():
            rule = FINDINGS[code]
            values = measured[rule.measure] or {}
            everywhere = len(groups) == len(self.groups) and len(groups) > 1
            for group in [None] if everywhere else groups:
                shown = fmt({g: values[g] for g in groups} if group is None else {group: values[group]})
                text = message(
                    rule, step=step, group=group, shown=shown, cfg=self.cfg, max_grad_norm=self.max_grad_norm
                )
                findings.append({"code": code, "step": step, "group": group, "message": text})
        return findings


def last_good_checkpoint(saved: list[str]) -> str | None:
    """The newest checkpoint saved during training that still exists (``save_total_limit`` deletes some), or None."""
    return next((c for c in reversed(saved) if Path(c).is_dir()), None)


def _num(value: float | None) -> float | None:
    """A JSON-safe number: non-finite values become ``None``."""
    return float(value) if value is not None and math.isfinite(value) else None


def report(
    findings: list[dict[str, Any]],
    groups: list[str],
    final: dict[str, dict[str, float]],
    steps: int,
    last_good: str | None,
    max_grad_norm: float | None,
) -> dict[str, Any]:
    """The ``health.json`` content.

    Args:
        findings: Every finding of the run.
        groups: The watched groups.
        final: ``{"grad_norm"|"drift"|"at_init": {group: value}}``, the last measurements (missing values are null).
        steps: Optimiser steps run.
        last_good: :func:`last_good_checkpoint`.
        max_grad_norm: The recipe's clipping threshold.
    """
    failed = any(f["code"] == "nonfinite_loss" for f in findings)
    status = "failed" if failed else ("warning" if findings else "ok")
    values = {key: {g: _num(final.get(key, {}).get(g)) for g in groups} for key in ("grad_norm", "drift", "at_init")}
    return {
        "status": status,
        "findings": list(findings),
        "final": values,
        "steps": steps,
        "last_good_checkpoint": last_good,
        "max_grad_norm": max_grad_norm,
    }


def summary_line(health: dict[str, Any]) -> str:
    """One line for the end of ``ia3 train``: status, steps, findings or the final values."""
    findings = health["findings"]
    if health["status"] == "failed":
        first = next(f for f in findings if f["code"] == "nonfinite_loss")
        good = health["last_good_checkpoint"] or "none saved"
        return f"health: FAILED at step {first['step']} (non-finite loss/gradient); last good checkpoint: {good}"
    if findings:
        codes = ", ".join(f["code"] + _where(f) for f in findings)
        return f"health: warning after {health['steps']} steps: {codes}; see health.json"
    grads = {g: v for g, v in health["final"]["grad_norm"].items() if v is not None}
    drift = {g: v for g, v in health["final"]["drift"].items() if v is not None}
    return f"health: ok ({health['steps']} steps) | grad {fmt(grads)} | drift {fmt(drift)}"


def _where(finding: dict[str, Any]) -> str:
    """`` (k)`` or `` (all groups)`` after a vector finding's code; nothing after an outcome finding's."""
    rule = FINDINGS.get(finding["code"])
    return "" if rule is not None and rule.measure == "accuracy" else f" ({finding['group'] or 'all groups'})"


def write(path: str | Path, health: dict[str, Any]) -> Path:
    """Write ``health.json`` atomically; returns the path."""
    path = Path(path)
    write_atomic(path, json.dumps(health, indent=2, allow_nan=False) + "\n")
    return path
