"""The training console and ``logs/train_log.jsonl``: a ``TrainerCallback`` in place of the Trainer's printers.

The Trainer prints each log as a Python dict (``PrinterCallback``) or draws tqdm bars for training and evaluation
(``ProgressCallback``); :func:`install` removes both and adds a :class:`TrainLogbook`, which

- draws ONE progress bar: step/total, epoch, loss, learning rate and the health monitor's status, live;
- prints one line per evaluation, with ``best`` when it is the best so far by the recipe's metric; the step-0
  evaluation (``training.eval_on_start``) is marked as the baseline, and the first line gives the majority-class
  rate of the evaluated rows (:attr:`TrainLogbook.majority`);
- prints the health monitor's periodic line in the same layout (:meth:`TrainLogbook.monitor_line` is the monitor's
  printer);
- appends every log of the Trainer to ``RUN/logs/train_log.jsonl`` as one JSON object: ``step``, ``epoch``,
  ``elapsed_s`` and the Trainer's keys (``loss``, ``learning_rate``, ``grad_norm``, the monitor's ``ia3/*`` values,
  ``eval_*`` metrics, the final ``train_*`` summary). ``ia3 report`` draws its curves from it.

Only the main process prints and writes. With ``verbose`` the Trainer's dict lines are kept as well.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ia3cli.report.console import Console

LOG_NAME = "logs/train_log.jsonl"
"""Where the step log goes, relative to the run dir."""

_MONITOR_LINE = re.compile(r"^step (\d+) \| (.*)$")
_HIDDEN_EVAL = ("_runtime", "_per_second")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class TrainLogbook(TrainerCallback):
    """Console progress and the JSON-lines step log of one training run (see the module docstring).

    Args:
        console: Where lines and the bar go (a disabled console on the other ranks).
        log_path: The ``train_log.jsonl`` file (appended to, so a resumed run keeps its history); ``None``: none.
        metric: The recipe's metric without ``eval_`` (``accuracy``, ``loss``); marks the best evaluation.
        greater_is_better: Whether a higher ``metric`` is better.
        health: Returns the monitor's current status (``ok``, ``warning``, ``failed``).

    Attributes:
        majority: The majority-class rate of the evaluation rows, shown once on the first evaluation line.
    """

    def __init__(
        self,
        console: Console,
        log_path: Path | None,
        metric: str,
        greater_is_better: bool,
        health: Callable[[], str] = lambda: "ok",
    ) -> None:
        self.console = console
        self.log_path = log_path
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.health = health
        self.best: float | None = None
        self.majority: float | None = None
        self._majority_shown = False
        self.max_steps = 0
        self._bar: Any = None
        self._t0 = time.monotonic()
        self._training = False

    def _where(self, step: int) -> str:
        return f"{step}/{self.max_steps}" if self.max_steps else str(step)

    def monitor_line(self, text: str) -> None:
        """The health monitor's printer: its periodic ``step N | grad ... | drift ...`` line in the console's layout."""
        match = _MONITOR_LINE.match(text)
        if match is None:
            self.console.line(text)
            return
        rest = match.group(2).replace(" | ", "  ")
        self.console.line(Console.event("health", self._where(int(match.group(1))), {"": self.health()}, rest))

    # ---- Trainer events ---------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Open the bar (at the resumed step, if any) and the log file."""
        self.max_steps = state.max_steps
        self._t0 = time.monotonic()
        self._training = True
        if self.log_path is not None and state.is_world_process_zero:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._bar = self.console.progress(state.max_steps, "train", start=state.global_step)
        self._bar.update(epoch=None, loss=None, lr=None, health=self.health())

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Move the bar to the Trainer's global step (its plain line waits for the loss when this step logs)."""
        if self._bar is not None:
            fields = {"epoch": f"{state.epoch or 0:.2f}", "health": self.health()}
            self._bar.goto(state.global_step, defer=control.should_log, **fields)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Append the log to ``train_log.jsonl``; show the loss on the bar, or print the evaluation line."""
        if not logs or not state.is_world_process_zero:
            return
        self._write(state, logs)
        if self._bar is not None and "loss" in logs:
            lr = logs.get("learning_rate")
            self._bar.update(loss=logs["loss"], lr=f"{lr:.1e}" if isinstance(lr, float) else lr)
            self._bar.refresh()
        evaluated = {
            k.removeprefix("eval_"): v
            for k, v in logs.items()
            if k.startswith("eval_") and not k.endswith(_HIDDEN_EVAL)
        }
        if evaluated and self._training:
            self._eval_line(state, evaluated)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Close the bar; later logs (the final evaluation) are still written but not printed."""
        self._training = False
        if self._bar is not None:
            self._bar.update(health=self.health())
            self._bar.close()
            self._bar = None

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _eval_line(self, state: TrainerState, evaluated: dict[str, Any]) -> None:
        shown = {k: v for k, v in evaluated.items() if isinstance(v, (int, float))}
        value = shown.get(self.metric)
        note = ""
        if self.majority is not None and not self._majority_shown:
            shown["majority"] = self.majority
            self._majority_shown = True
        if state.global_step == 0:
            note = "<- baseline before training"
        elif isinstance(value, (int, float)) and math.isfinite(value):
            better = self.best is None or (value > self.best if self.greater_is_better else value < self.best)
            if better:
                self.best = float(value)
                note = f"<- best {self.metric}"
        where = self._where(state.global_step)
        if state.epoch is not None:
            where += f"  epoch {state.epoch:.2f}"
        self.console.line(Console.event("eval", where, shown, note))

    def _write(self, state: TrainerState, logs: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "elapsed_s": round(time.monotonic() - self._t0, 3)}
        record.update({k: _json_value(v) for k, v in logs.items() if k != "total_flos"})
        if not self._training:
            record["after_training"] = True  # the final evaluation (of the best checkpoint, when it was reloaded)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")


def install(trainer: Any, logbook: TrainLogbook, *, verbose: bool = False) -> None:
    """Replace the Trainer's printing callbacks by ``logbook`` (the dict printer stays with ``verbose``).

    Call it after the health monitor is attached: the logbook must see the ``ia3/*`` values the monitor adds to the
    logs, so it runs after the monitor.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    if not verbose:
        trainer.remove_callback(PrinterCallback)
    trainer.add_callback(logbook)
