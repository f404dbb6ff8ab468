"""The IA3 training-health monitor: per-group gradient norms and drift, findings with causes and fixes.

IA3 trains very few parameters (about 1e5 for a 1B model), so the global gradient norm the Trainer logs says little
about them, and the most common failure is silent: the vectors never leave 1.0. :class:`GradNormMonitor` is a
``TrainerCallback`` that watches the IA3 vectors themselves, grouped by what they scale:

- ``k``, ``v``, ``q``: attention keys, values, queries; ``qkv``: fused projections (``c_attn``, ``query_key_value``);
- ``ff``: feed-forward modules (PEFT's ``IA3Layer.is_feedforward``, whose *input* is scaled);
- ``other``: any other IA3 target.

Each optimiser step it measures the gradient norm of each group *before* clipping (a handful of grouped tensor ops);
every ``monitor.every_steps`` steps it also measures each group's drift from initialisation (mean ``|l - 1|``) and the
share of entries still exactly 1.0, prints one line, and checks for problems. Values go into the Trainer's logs as
``ia3/grad_norm_<group>``, ``ia3/drift_<group>``, ``ia3/at_init_<group>`` (and ``..._layer_<i>`` with
``monitor.per_layer``), so they reach ``log_history`` and TensorBoard.

Findings and their causes and fixes are the pure rules of :mod:`ia3cli.training.health` (its ``FINDINGS`` table); on a
non-finite loss or IA3 gradient training stops at once, the broken gradients are dropped before the optimiser step,
and no checkpoint is saved from that state, so the last checkpoint stays good. ``monitor.on_problem: stop`` also
stops training on the other findings. ``health.json`` records the outcome; the monitor is its only writer (at
``on_train_end``).

Groups come from the target plan (``TargetPlan.groups``: module name -> group, from the family table or shape
analysis); without a plan, from the family table by ``config.model_type`` and PEFT's ``is_feedforward`` flag.

Why a gradient hook: in transformers 5.x the Trainer clips *before* ``on_pre_optimizer_step``, and its pre-clip
norm reaches callbacks only at logging steps, as one global number. So the monitor hooks the IA3 vectors
(``register_post_accumulate_grad_hook``); the first hook of a backward pass queues one autograd-engine callback
that runs after the last micro-batch's gradients are accumulated and before clipping, and computes every group and
layer norm with one ``_foreach_norm`` and one small matmul. ``on_pre_optimizer_step`` reads them with one
``tolist()``, the one host sync the monitor adds per step (it lets a non-finite step be dropped at once).

How values reach reporters: ``Trainer.log`` calls every callback's ``on_log`` with the same ``logs`` dict, in
registration order; the monitor adds its values there, so reporters listed after it in ``callbacks=`` (with
``report_to="none"``) see them. ``log_history`` keeps the Trainer's own values only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ia3cli.config.families import GROUPS
from ia3cli.training import health
from ia3cli.training.vectors import all_processes_agree, drift_stats, ia3_parameters, slot_indices

if TYPE_CHECKING:
    from ia3cli.config.recipe import MonitorSection

SCALER_NONFINITE_TOLERANCE = 8
"""Under an fp16 loss scaler overflowing steps are normal (the scaler skips them): fail after this many in a row."""


class GradNormMonitor(TrainerCallback):
    """Watches IA3 gradient norms and drift during training and explains what is wrong.

    Clipping itself is the Trainer's (when ``args.max_grad_norm > 0``; ``None`` raises a ``TypeError`` at the first
    step in transformers 5.23, so ``max_grad_norm: null`` must reach ``TrainingArguments`` as 0.0). The monitor
    checks this at train begin (a mismatch is a ``ValueError``) and warns when clipping is disabled.

    Register it with ``Trainer(callbacks=[monitor, *reporters])`` (and ``report_to="none"``): callbacks listed after
    it receive the ``ia3/*`` values; running after the Trainer's ``DefaultFlowCallback`` (always first) lets it veto
    that callback's checkpoint on a non-finite step.

    After a failure (:attr:`failed`) the model in memory holds the broken state (unless ``load_best_model_at_end``
    restored a checkpoint): the training code should not save it as the adapter, but raise ``RunError`` naming
    :attr:`last_checkpoint` (``summary_line()`` says the same).

    Args:
        cfg: The recipe's ``monitor`` section.
        max_grad_norm: The recipe's ``training.max_grad_norm`` (``None``: clipping disabled).
        output_dir: Where ``health.json`` is written (the run directory).
        groups: Module name -> group from the target plan (``TargetPlan.groups``); None: from the family table.
        printer: Receives each printed line (default ``print``).

    Attributes:
        findings: Findings so far, as in ``health.json``.
        stopped_by: The finding code that stopped training, if any.
        saved_checkpoints: Checkpoints saved during training, oldest first (some may be deleted since).
    """

    def __init__(
        self,
        cfg: MonitorSection,
        max_grad_norm: float | None,
        output_dir: str | Path,
        groups: Mapping[str, str] | None = None,
        printer: Callable[[str], Any] = print,
    ) -> None:
        self.cfg = cfg
        self.max_grad_norm = max_grad_norm
        self.output_dir = Path(output_dir)
        self.groups = dict(groups) if groups is not None else None
        self.printer = printer
        self.findings: list[dict[str, Any]] = []
        self.stopped_by: str | None = None
        self.saved_checkpoints: list[str] = []
        self._checks = health.Checks(cfg, max_grad_norm, [])
        self._hooks: list[Any] = []
        self._params: list[torch.nn.Parameter] = []
        self._groups: list[str] = []
        self._layers: list[str | None] = []
        self._group_names: list[str] = []
        self._layer_names: list[str] = []
        self._index: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._queued = False
        self._pending: torch.Tensor | None = None
        self._last_grad: dict[str, float] | None = None
        self._last_layer_grad: dict[str, float] = {}
        self._drift_cache: tuple[int, dict[str, float] | None] = (-1, None)
        self._final_drift: dict[str, float] | None = None
        self._steps = 0
        self._nonfinite_run = 0
        self._scaler_active = False
        self._multi_device = False
        self._note_unavailable = True

    # ---- public API -------------------------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        """Whether a non-finite loss or gradient was seen."""
        return any(f["code"] == "nonfinite_loss" for f in self.findings)

    @property
    def last_checkpoint(self) -> str | None:
        """The newest checkpoint saved during training that still exists (the last good one after a failure)."""
        return health.last_good_checkpoint(self.saved_checkpoints)

    @property
    def health(self) -> dict[str, Any]:
        """The ``health.json`` content: status, findings, final per-group values, steps."""
        drift = self._final_drift or self._drift_cache[1] or {}
        final = {
            "grad_norm": dict(self._last_grad or {}),
            "drift": {g: drift[f"drift_{g}"] for g in self._group_names if f"drift_{g}" in drift},
            "at_init": {g: drift[f"at_init_{g}"] for g in self._group_names if f"at_init_{g}" in drift},
        }
        return health.report(
            self.findings, self._group_names, final, self._steps, self.last_checkpoint, self.max_grad_norm
        )

    def summary_line(self) -> str:
        """One line for the end of ``ia3 train``: status, steps, findings or the final values."""
        return health.summary_line(self.health)

    # ---- Trainer events ---------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Check the clipping setting, find and group the IA3 vectors, install the gradient hooks.

        Raises:
            ValueError: when ``args.max_grad_norm`` does not match the recipe's (0.0 standing for ``None``).
        """
        expected = self.max_grad_norm if self.max_grad_norm is not None else 0.0
        actual = args.max_grad_norm or 0.0
        if not math.isclose(actual, expected) and not (expected <= 0 and actual <= 0):
            raise ValueError(
                f"TrainingArguments.max_grad_norm is {args.max_grad_norm} but the recipe says {self.max_grad_norm}; "
                f"pass max_grad_norm={expected} (0.0 disables clipping in transformers' Trainer)"
            )
        if self.max_grad_norm is None:
            self.printer(
                "warning: gradient clipping is disabled (training.max_grad_norm: null); IA3 gradients explode "
                "easily, set training.max_grad_norm: 1.0"
            )
        self._remove_hooks()
        model = kwargs["model"]
        found = ia3_parameters(model, self.groups)
        if not found:
            self.printer("warning: the health monitor found no trainable IA3 vectors (ia3_l); nothing to watch")
        self._params = [p for _, p, _, _ in found]
        self._groups = [g for _, _, g, _ in found]
        self._layers = [layer for _, _, _, layer in found]
        self._group_names = [g for g in GROUPS if g in self._groups]
        self._layer_names = list(dict.fromkeys(layer for layer in self._layers if layer is not None))
        self._checks = health.Checks(self.cfg, self.max_grad_norm, self._group_names)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Forget the previous step's measurement."""
        self._pending = None

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Read this step's pre-clip norms; on a non-finite gradient drop the gradients and stop training."""
        step = state.global_step + 1
        values = self._read_pending(kwargs.get("optimizer"))
        finite = all_processes_agree(values is None or all(math.isfinite(v) for v in values), self._params)
        if finite:
            self._nonfinite_run = 0
            if values is not None:
                self._record(values)
            return control
        self._nonfinite_run += 1
        if self._scaler_active and self._nonfinite_run < SCALER_NONFINITE_TOLERANCE:
            return control  # fp16 overflow: the loss scaler skips this step and lowers its scale
        if values is not None:
            self._record(values)
        bad = [g for g in self._group_names if not math.isfinite((self._last_grad or {}).get(g, 0.0))]
        kwargs["model"].zero_grad(set_to_none=True)  # the optimiser skips parameters without gradients
        self._fail(step, bad, control)
        return control

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Every ``every_steps`` steps: measure drift, print a line, check for findings."""
        self._steps = state.global_step
        if self.failed:
            self._block(control)
            return control
        if not self._params or state.global_step % self.cfg.every_steps:
            return control
        self._check(state.global_step, control)
        return control

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Veto the end-of-epoch checkpoint and evaluation after a failure."""
        if self.failed:
            self._block(control)
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        """Add the ``ia3/*`` values to the training logs every later callback (the reporters) receives."""
        if logs is None or "loss" not in logs or not self._params:
            return control
        loss = logs["loss"]
        if isinstance(loss, float) and not math.isfinite(loss) and not self.failed:
            self._fail(state.global_step, [], control)
        logs.update(self._log_values(state.global_step))
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Remember the checkpoint just saved (the Trainer names it ``checkpoint-<step>``)."""
        self.saved_checkpoints.append(str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remove the hooks, take the final measurements and write ``health.json`` (on the main process only).

        This is the one place ``health.json`` is written. It names the last good checkpoint only if it still exists
        (``save_total_limit`` may have deleted it at the end of training).
        """
        self._steps = state.global_step
        self._remove_hooks()
        if self._params:
            self._final_drift = self._drift_stats()
        if state.is_world_process_zero:
            health.write(self.output_dir / "health.json", self.health)

    # ---- measurement ------------------------------------------------------------------------------------------

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per-parameter and per-element slot indices (groups, then layers, then a spare slot), built once."""
        if device not in self._index:
            names = (self._group_names, self._layer_names)
            self._index[device] = slot_indices(self._params, self._groups, self._layers, *names, device)
            self._multi_device = len({p.device for p in self._params}) > 1
        return self._index[device]

    def _on_grad(self, param: torch.Tensor) -> None:
        """Per-parameter hook: queue one measurement for the end of this backward pass."""
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._measure_grads)

    def _measure_grads(self) -> None:
        """After a backward pass (before clipping): per-group and per-layer gradient norms, kept on device."""
        self._queued = False
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):
            zero = [torch.zeros((), device=p.device) for p in self._params]
            grads = [g if g is not None else z for g, z in zip(grads, zero, strict=True)]
        device = grads[0].device
        slots = self._indices(device)[0]
        norms = torch._foreach_norm(grads, 2, torch.float32)
        if self._multi_device:
            norms = [n.to(device) for n in norms]
        self._pending = (torch.stack(norms).square_() @ slots).sqrt_()

    def _read_pending(self, optimizer: Any) -> list[float] | None:
        """This step's norms as floats (unscaled under an fp16 loss scaler); ``None`` when none were measured."""
        pending, self._pending = self._pending, None
        n = len(self._group_names) + len(self._layer_names) + 1
        if pending is None:
            if not self._params:
                return None
            if any(p.grad is not None for p in self._params):
                if self._note_unavailable:
                    self.printer("note: IA3 gradient hooks did not fire (sharded training?); gradient checks are off")
                    self._note_unavailable = False
                return None
            return [0.0] * n  # no IA3 vector received a gradient: that is a vanishing gradient
        values = pending.tolist()
        scaler = getattr(optimizer, "scaler", None)
        self._scaler_active = bool(scaler is not None and scaler.is_enabled())
        if self._scaler_active:
            scale = scaler.get_scale()
            values = [v / scale for v in values]
        return values

    def _record(self, values: list[float]) -> None:
        """Keep the measured per-group and per-layer norms."""
        n_groups = len(self._group_names)
        self._last_grad = dict(zip(self._group_names, values[:n_groups], strict=True))
        self._last_layer_grad = dict(zip(self._layer_names, values[n_groups:-1], strict=True))

    def _drift_stats(self) -> dict[str, float]:
        """Mean |l - 1| and the share of entries exactly 1.0, per group and per layer (keys as in the logs)."""
        indices = self._indices(self._params[0].device)
        return drift_stats(self._params, indices, self._group_names, self._layer_names)

    def _drift(self, step: int) -> dict[str, float]:
        """Drift statistics for ``step``, computed at most once per step."""
        if self._drift_cache[0] != step or self._drift_cache[1] is None:
            self._drift_cache = (step, self._drift_stats())
        return self._drift_cache[1]

    def _log_values(self, step: int) -> dict[str, float]:
        drift = self._drift(step)
        out: dict[str, float] = {}
        for g in self._group_names:
            if self._last_grad is not None:
                out[f"ia3/grad_norm_{g}"] = self._last_grad[g]
            out[f"ia3/drift_{g}"] = drift[f"drift_{g}"]
            out[f"ia3/at_init_{g}"] = drift[f"at_init_{g}"]
        if self.cfg.per_layer:
            for la in self._layer_names:
                if la in self._last_layer_grad:
                    out[f"ia3/grad_norm_layer_{la}"] = self._last_layer_grad[la]
                out[f"ia3/drift_layer_{la}"] = drift[f"drift_layer_{la}"]
        return out

    # ---- checks and findings ----------------------------------------------------------------------------------

    def _check(self, step: int, control: TrainerControl) -> None:
        """One health check: print a line, then let the rules of :mod:`ia3cli.training.health` decide."""
        drift = self._drift(step)
        grad = self._last_grad
        line = f"step {step}"
        if grad is not None:
            line += f" | grad {health.fmt(grad)}"
        line += " | drift " + health.fmt({g: drift[f"drift_{g}"] for g in self._group_names})
        still = {g: drift[f"at_init_{g}"] for g in self._group_names}
        if any(v > 0 for v in still.values()):
            line += " | at 1.0 " + " ".join(f"{g} {v:.0%}" for g, v in still.items())
        self.printer(line)
        if any(not math.isfinite(v) for v in drift.values()):
            self._fail(step, [g for g in self._group_names if not math.isfinite(drift[f"drift_{g}"])], control)
            return
        drift_by_group = {g: drift[f"drift_{g}"] for g in self._group_names}
        for finding in self._checks.update(step, grad, drift_by_group):
            self.findings.append(finding)
            self.printer(f"warning: {finding['code']}: {finding['message']}")
            if self.cfg.on_problem == "stop" and self.stopped_by is None:
                control.should_training_stop = True
                self.stopped_by = finding["code"]
                self.printer(f"stopping training at step {step} (monitor.on_problem: stop)")

    def _fail(self, step: int, groups: list[str], control: TrainerControl) -> None:
        """Record a non-finite loss/gradient, stop training and veto saving."""
        finding = health.nonfinite(step, groups, self.last_checkpoint)
        self.findings.append(finding)
        self.stopped_by = "nonfinite_loss"
        self.printer(f"error: nonfinite_loss: {finding['message']}")
        self._block(control)

    @staticmethod
    def _block(control: TrainerControl) -> None:
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False
