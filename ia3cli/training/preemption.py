"""Jobs that survive preemption: on SIGTERM or SIGUSR1, finish the optimiser step, checkpoint, stop, exit 75.

Shared clusters tell a job to stop before they kill it: SLURM sends SIGTERM on ``scancel`` and at the end of the time
limit (or, with ``--signal=USR1@120``, SIGUSR1 two minutes before it), Kubernetes and spot instances send SIGTERM and
wait a grace period. :class:`PreemptionWatch` turns that into a clean stop:

1. The signal handler only records the signal (it runs between two bytecodes of the training loop, so it must not
   save anything itself). Further signals are ignored: a second SIGTERM, e.g. the one torchrun forwards to its workers
   after the job's own, can never interrupt the checkpoint being written.
2. At the end of each optimiser step the ranks agree (one all-reduce of a flag) whether any of them was told to stop,
   so they all stop after the same step even when the signal reached them at different moments.
3. The Trainer then saves a regular checkpoint for that step (``checkpoints/checkpoint-<step>``) and leaves its loop.
   Its ``trainer_state.json`` is written last (transformers 5.24 ``Trainer._save_checkpoint``), and
   ``training.run.latest_checkpoint`` only takes a checkpoint that has it and a readable adapter, so a save cut short
   by SIGKILL is skipped and the newest complete one is resumed: an older checkpoint is only deleted (rotation) after
   a newer one is complete.
4. The run writes ``health.json`` and ``run.json`` with status ``preempted`` and raises :class:`Preempted`: the
   console prints what happened and the ``--resume`` command, and the process exits with :data:`PREEMPTED_EXIT` (75,
   ``EX_TEMPFAIL``: try again later; requeue scripts can test for it).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ia3cli.env import is_main_process
from ia3cli.errors import Preempted
from ia3cli.outputs import write_atomic
from ia3cli.training import health as health_rules

if TYPE_CHECKING:
    from ia3cli.config.recipe import Recipe

PREEMPTED_EXIT = Preempted.exit_code
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch(TrainerCallback):
    """Record SIGTERM / SIGUSR1 and stop training after the current optimiser step, with a checkpoint.

    Create it before the model loads (a signal during loading then stops at the first step) and call :meth:`close`
    when the run ends, which puts the previous handlers back. Created outside the main thread it installs nothing
    (Python lets only the main thread set signal handlers) and never stops a run.

    Attributes:
        received: The name of the first signal received (``"SIGTERM"``), else ``None``.
        stopped_at: The optimiser step training stopped after because of it, else ``None``.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.received: str | None = None
        self.stopped_at: int | None = None
        # only the main thread may set handlers; a run started from another thread keeps the process's own
        main = threading.current_thread() is threading.main_thread()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals} if main else {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def close(self) -> None:
        """Restore the signal handlers found at creation, unless a signal was received: then the process is on its
        way out with status 75, and a repeated signal (schedulers may send more than one) must not kill it before
        it has said so, so this watch's handler, which only records, stays."""
        if self.received is None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous = {}

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """After each optimiser step: if any rank was signalled, save a checkpoint now and stop."""
        if _any_process(self.received is not None, kwargs.get("model")) and self.stopped_at is None:
            self.received = self.received or "a signal on another rank"
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False
        return control


def _any_process(flag: bool, model: Any) -> bool:
    """True when ``flag`` is true on any process (one all-reduce of one number under several processes)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() > 0


def update_run_info(out: Path, **fields: Any) -> None:
    """Rewrite ``run.json`` with ``fields`` changed (its status: running, finished, preempted)."""
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    write_atomic(out / "run.json", json.dumps({**info, **fields}, indent=2) + "\n")


def stop(recipe: Recipe, out: Path, watch: Any, health: dict[str, Any]) -> None:
    """After a preemption checkpoint: ``health.json`` and ``run.json`` say so, then :class:`Preempted` is raised.

    Raises:
        Preempted: always (exit status 75).
    """
    checkpoint = out / "checkpoints" / f"checkpoint-{watch.stopped_at}"
    facts = {"signal": watch.received, "step": watch.stopped_at, "checkpoint": str(checkpoint)}
    if is_main_process():
        health_rules.write(out / "health.json", {**health, "status": "preempted", "preempted": facts})
        update_run_info(out, status="preempted", preempted=facts)
    source = recipe.source or "RECIPE"
    raise Preempted(
        f"{watch.received} received: training stopped after step {watch.stopped_at}, checkpoint {checkpoint}",
        f"continue with the same command plus --resume, e.g. ia3 train {source} --resume",
    )
