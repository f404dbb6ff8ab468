"""``ia3 train``: the training story, top to bottom.

1. Pre-flight (shared with ``ia3 validate``): targets resolved on a meta-device model, every data row checked, the
   memory per rank estimated.
2. The run directory is claimed: refused when it holds another run (``--overwrite``), reused with ``--resume``.
   ``recipe.yaml`` (resolved, overrides applied) and ``run.json`` (versions, world size, status) are written first.
3. Tokenizer + base model (full precision, 4-bit or 8-bit; sharded across ranks with ``training.distributed:
   fsdp``) wrapped with IA3; the trainable-parameter line.
4. Tokenized splits with a dynamic-padding collator; one function maps the recipe to ``TrainingArguments``.
5. ``Trainer.train`` with the health monitor and the preemption watch; checkpoints under ``OUTPUT_DIR/checkpoints``.
   On SIGTERM / SIGUSR1 the run checkpoints after the current step and stops with exit status 75
   (:mod:`ia3cli.training.preemption`).
6. Final evaluation, then the adapter, tokenizer, ``metrics.json``, ``health.json`` and a model card, each written
   to a temporary name and renamed, so a kill never leaves a truncated file behind; ``run.json`` says ``finished``.

Works unchanged under ``torchrun`` / ``accelerate launch`` (``ia3 train --nproc N`` calls torchrun): rank 0 claims
the run directory while the other ranks wait, and only rank 0 writes files and prints. DDP or FSDP:
:mod:`ia3cli.training.distributed`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia3cli.config.load import dump_recipe
from ia3cli.config.recipe import Recipe
from ia3cli.env import is_main_process, world_size
from ia3cli.errors import Ia3Error, RunError
from ia3cli.outputs import publish_dir, write_atomic
from ia3cli.report.console import Console
from ia3cli.training import distributed
from ia3cli.training.model_card import method_summary, model_card
from ia3cli.training.rundir import claim_output_dir, latest_checkpoint, run_info


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    health_line: str = ""


def training_arguments(recipe: Recipe, out: Path) -> Any:
    """Map ``recipe.training`` to ``transformers.TrainingArguments`` (the one place this happens)."""
    from transformers import TrainingArguments

    from ia3cli.models.device import precision_flags

    t = recipe.training
    precision = precision_flags(t.precision)
    evaluate = recipe.data.eval_split is not None and t.eval_strategy != "no"
    metric = recipe.metric
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or 2 * t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        # T-Few's Adafactor: transformers sets relative_step=False and scale_parameter=False for optim="adafactor"
        optim="adafactor" if t.optimizer == "adafactor" else TrainingArguments.optim,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps in transformers 5
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        eval_strategy=t.eval_strategy if evaluate else "no",
        eval_on_start=t.eval_on_start and recipe.data.eval_split is not None,  # the step-0 baseline
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        load_best_model_at_end=t.load_best_model_at_end and evaluate,
        metric_for_best_model=metric if evaluate else None,
        greater_is_better=metric != "loss",
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",  # reporters are callbacks listed after the monitor (_callbacks), so they get its values
        # tfew rows hold all their choices: no single length to group by
        train_sampling_strategy="group_by_length" if t.group_by_length and t.objective != "tfew" else "random",
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=_has_accelerator(),
        label_names=["labels"],  # PEFT wraps forward(**kwargs): the Trainer cannot infer label names itself
        remove_unused_columns=False,  # rows are already reduced to model inputs
        **precision,  # autocast of the matmuls; the IA3 vectors stay float32
        ddp_find_unused_parameters=False,  # every IA3 vector is used in every step
        disable_tqdm=True,  # ia3cli.training.logbook draws the one progress bar
        # Without a GPU, Accelerate runs one process per launcher rank only when told to use the CPU (gloo);
        # otherwise each rank would train alone on all the data. bf16 autocast on the CPU needs it too.
        use_cpu=(world_size() > 1 or precision["bf16"]) and not _has_accelerator(),
        **distributed.trainer_arguments(recipe),
    )


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _callbacks(recipe: Recipe, out: Path, printer: Callable[[str], None], monitor: Any | None) -> list[Any]:
    """The monitor first, then the reporters: ``Trainer.log`` hands one ``logs`` dict to the callbacks in order."""
    from transformers import EarlyStoppingCallback
    from transformers.integrations import get_reporting_integration_callbacks

    callbacks: list[Any] = [monitor] if monitor is not None else []
    callbacks += get_reporting_integration_callbacks([r for r in recipe.training.report_to if r != "tensorboard"])
    if recipe.training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.training.early_stopping_patience))
    if "tensorboard" in recipe.training.report_to and is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "logs"))))
        printer(f"TensorBoard logs: tensorboard --logdir {out / 'logs'}")
    return callbacks


def run(
    recipe: Recipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    printer: Callable[[str], None] = print,
    console: Console | None = None,
    verbose: bool = False,
    report: bool = True,
) -> RunResult:
    """Train an IA3 adapter as the recipe says and save a self-describing run directory.

    Args:
        recipe: A validated recipe.
        resume: Continue from the newest complete checkpoint in ``output_dir/checkpoints``.
        overwrite: Delete an existing, different run in ``output_dir`` first.
        printer: Where progress lines go (only the main process prints); used when no ``console`` is given.
        console: The console for lines and the progress bar (the CLI's); default: plain lines to ``printer``.
        verbose: Keep the Trainer's own dict log lines on the console.
        report: Draw ``report.png`` at the end and show it in the model card.

    Raises:
        RecipeError, DataError: from the pre-flight checks (nothing is written then).
        Ia3Error: when ``output_dir`` holds another run.
        RunError: when training fails (non-finite loss, disk full, ...).
    """
    from accelerate import PartialState

    from ia3cli.training import preemption, preflight

    if resume and overwrite:
        raise Ia3Error(
            "--resume and --overwrite together: --overwrite would delete the checkpoints --resume continues from",
            "drop --overwrite to continue the run, or drop --resume to start it over",
        )
    console = console or Console(enabled=is_main_process(), sink=printer)
    say = console.line if is_main_process() else (lambda _msg: None)
    checks = preflight.run(recipe)
    plan = checks.plan
    say(f"pre-flight ok: {_split_summary(checks.data)}; {method_summary(recipe, plan)}")
    if recipe.training.distributed == "fsdp" or checks.memory_warnings:
        say(checks.memory)
    for warning in [*checks.warnings, *checks.memory_warnings]:
        say(f"warning: {warning}")

    out = Path(recipe.training.output_dir)
    args = training_arguments(recipe, out)  # sets up Accelerate: under torchrun / accelerate launch, all ranks meet
    try:
        if is_main_process():
            claim_output_dir(recipe, out, resume=resume, overwrite=overwrite)
            write_atomic(out / "recipe.yaml", dump_recipe(recipe))
            write_atomic(out / "run.json", json.dumps(run_info(recipe, plan), indent=2) + "\n")
        # The other ranks start only once rank 0 has claimed the run dir (or they wait there until the launcher
        # stops them after rank 0's refusal): none of them ever sees it half-made or looks for checkpoints early.
        PartialState().wait_for_everyone()
        # from here on SIGTERM / SIGUSR1 stop the run after an optimiser step, with a checkpoint
        watch = preemption.PreemptionWatch()
        try:
            result = _train(
                recipe, checks, out, args, watch, resume=resume, console=console, verbose=verbose, draw=report
            )
            distributed.leave_process_group()
            return result
        finally:
            watch.close()
    except OSError as exc:
        raise RunError(f"{out}: {exc.strerror or exc} while training", "free disk space or fix permissions") from None


def _train(
    recipe: Recipe,
    checks: Any,
    out: Path,
    args: Any,
    watch: Any,
    *,
    resume: bool,
    console: Console,
    verbose: bool,
    draw: bool,
) -> RunResult:
    from transformers import set_seed

    from ia3cli.training import outcome, preemption

    say = console.line if is_main_process() else (lambda _msg: None)
    set_seed(recipe.training.seed)
    model, tokenizer, counts = _setup_model(recipe, checks.plan, say)
    trainer, monitor, eval_ds = _setup_trainer(recipe, checks, out, args, model, tokenizer, console, verbose)
    trainer.add_callback(watch)
    distributed.allow_checkpoints(trainer, recipe)
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    if resume:
        say(f"resuming from {checkpoint}" if checkpoint else "no complete checkpoint found: starting from step 0")
    args.eval_on_start = args.eval_on_start and checkpoint is None  # the resumed history holds the step-0 baseline
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    ia3 = recipe.adapter.method == "ia3"
    health = monitor.health if ia3 else {"status": f"not monitored (adapter.method: {recipe.adapter.method})"}
    if watch.stopped_at is not None:
        preemption.stop(recipe, out, watch, health)
    if monitor.failed:  # health.json is already written (the monitor's on_train_end)
        raise RunError(
            f"training stopped: {monitor.summary_line()}",
            f"the last good checkpoint is kept in {out / 'checkpoints'}; see {out / 'health.json'}",
        )
    metrics = _final_metrics(recipe, trainer, result, eval_ds, checks.data, tokenizer, counts)
    if ia3:  # no_gain_over_base, below_majority_class: health.json is rewritten with them
        history = [*trainer.state.log_history, {"step": trainer.state.global_step, **metrics}]
        health_json = out / "health.json" if is_main_process() else None
        outcome.record(history, metrics, metrics.get("rows_evaluated", 0), monitor, recipe, say, health_json)
        health = monitor.health
    health_line = monitor.summary_line() if ia3 else f"health: {health['status']}"
    if is_main_process():
        _save(recipe, checks.plan, out, trainer.model, tokenizer, metrics, counts, health)
        if draw and ia3 and _write_report(out, say):  # the report draws the IA3 vectors
            card = model_card(recipe, checks.plan, metrics, counts, health, report="report.png")
            write_atomic(out / "README.md", card)
        preemption.update_run_info(out, status="finished")
    return RunResult(output_dir=out, metrics=metrics, health=health, health_line=health_line)


def _setup_model(recipe: Recipe, plan: Any, say: Callable[[str], None]) -> tuple[Any, Any, dict[str, int]]:
    """The wrapped model, its tokenizer and parameter counts (printed, and checked against the plan)."""
    from ia3cli.models import loading as modeling
    from ia3cli.tuners import ia3

    model, tokenizer = ia3.build(recipe, plan)
    if recipe.adapter.init_from:
        ia3.load_init_vectors(model, recipe.adapter.init_from)
        say(f"IA3 vectors start from {recipe.adapter.init_from}")
    counts = modeling.count_parameters(model)
    say(
        f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || "
        f"trainable%: {100 * counts['trainable'] / counts['total']:.4f} "
        f"(IA3 vectors: {counts['ia3']:,}, other: {counts['other_trainable']:,})"
    )
    if counts["sharded_tensors"]:
        say(f"fsdp: {counts['sharded_tensors']:,} base tensors sharded over {world_size()} rank(s), trained ones whole")
    if recipe.adapter.method == "ia3" and counts["ia3"] != plan.ia3_params:
        say(f"warning: {counts['ia3']:,} IA3 parameters were created, {plan.ia3_params:,} were planned")
    if recipe.model.task != "causal-lm":
        # These heads average their loss per batch and ignore ``num_items_in_batch``. Unless told so, the Trainer
        # (transformers 5) multiplies their loss by the number of processes and skips the division by
        # gradient_accumulation_steps: the gradient would grow with the world size and the accumulation.
        (model.get_base_model() if hasattr(model, "get_base_model") else model).accepts_loss_kwargs = False
    return model, tokenizer, counts


def _setup_trainer(
    recipe: Recipe, checks: Any, out: Path, args: Any, model: Any, tokenizer: Any, console: Console, verbose: bool
) -> tuple[Any, Any, Any]:
    """The Trainer (or the ChoiceTrainer) with its datasets, the health monitor and the console logbook."""
    from transformers import Trainer

    from ia3cli.data import encoding as data
    from ia3cli.scoring import evaluation
    from ia3cli.scoring.chance import majority_of
    from ia3cli.training import row_data
    from ia3cli.training.choice_trainer import ChoiceTrainer
    from ia3cli.training.logbook import LOG_NAME, TrainLogbook, install
    from ia3cli.training.monitor import GradNormMonitor
    from ia3cli.training.outcome import KeepRngAcrossStep0

    # the splits pre-flight checked; choice tasks and prompt templates take row_data's datasets and the ChoiceTrainer
    few = row_data.applies(recipe)
    train_ds, eval_ds, collator = (row_data.build_data if few else data.build)(recipe, tokenizer, checks.data)
    logbook = TrainLogbook(
        console, out / LOG_NAME if is_main_process() else None, recipe.metric, recipe.metric != "loss"
    )
    monitor = GradNormMonitor(
        recipe.monitor, recipe.training.max_grad_norm, out, groups=checks.plan.groups, printer=logbook.monitor_line
    )
    logbook.health = lambda: "failed" if monitor.failed else ("warning" if monitor.findings else "ok")
    logbook.majority = majority_of(checks.data.eval or [], recipe)
    say = console.line if is_main_process() else (lambda _msg: None)
    callbacks = _callbacks(recipe, out, say, monitor if recipe.adapter.method == "ia3" else None)
    if isinstance(train_ds, row_data.RowDataset):
        callbacks.append(row_data.TemplateEpochs(train_ds))
    callbacks.append(KeepRngAcrossStep0())  # the step-0 evaluation leaves training as it would be without it
    metrics_fn = evaluation.trainer_metrics(recipe.num_labels) if recipe.model.task == "seq-cls" else None
    t = recipe.training
    extra = {"objective": t.objective, "weights": (t.lm_weight, t.ln_weight, t.ul_weight)} if few else {}
    trainer = (ChoiceTrainer if few else Trainer)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if args.eval_strategy != "no" or args.eval_on_start else None,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=evaluation.choice_trainer_metrics if recipe.has_choices else metrics_fn,
        callbacks=callbacks,
        **extra,
    )
    install(trainer, logbook, verbose=verbose)  # one progress bar instead of the Trainer's dicts and tqdm bars
    return trainer, monitor, eval_ds


def _final_metrics(
    recipe: Recipe, trainer: Any, result: Any, eval_ds: Any, report: Any, tokenizer: Any, counts: dict[str, int]
) -> dict[str, Any]:
    """The Trainer's metrics, a final evaluation, and what the run was (steps, batch sizes, method, sizes)."""
    from ia3cli.scoring import evaluation
    from ia3cli.scoring.chance import majority_of
    from ia3cli.training.outcome import baseline_metrics

    metrics: dict[str, Any] = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate(eval_ds))
    rows = list(report.eval) if report.eval is not None else []
    if "eval_accuracy" not in metrics:  # choice tasks rank-classify inside trainer.evaluate
        metrics.update(evaluation.after_training(trainer.model, tokenizer, recipe, rows or None))
    metrics.update({f"baseline_{k}": v for k, v in baseline_metrics(trainer.state.log_history).items()})
    majority = majority_of(rows, recipe)
    if majority is not None:
        metrics.update(majority_accuracy=majority, rows_evaluated=len(rows))
    t, world = recipe.training, trainer.args.world_size  # what the Trainer trained with, not what was asked for
    metrics.update(
        {
            "global_step": trainer.state.global_step,
            "world_size": world,
            "per_device_batch_size": t.batch_size,
            "global_batch_size": t.batch_size * t.gradient_accumulation_steps * world,
            "method": recipe.adapter.method,
            "trainable_params": counts["trainable"],
            "ia3_params": counts["ia3"],
        }
    )
    return metrics


def _save(
    recipe: Recipe,
    plan: Any,
    out: Path,
    model: Any,
    tokenizer: Any,
    metrics: dict[str, Any],
    counts: dict[str, int],
    health: dict[str, Any],
) -> None:
    """Adapter, tokenizer, ``metrics.json`` and the model card: staged, then each renamed into the run dir."""
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    (staging / "README.md").write_text(model_card(recipe, plan, metrics, counts, health))
    publish_dir(staging, out)


def _write_report(out: Path, say: Callable[[str], None]) -> bool:
    """Draw ``report.png``; a failure is a warning (the adapter is saved already), not a failed run."""
    from ia3cli.report import build as report

    try:
        report.write(out, out / "report.png")
    except Exception as exc:  # matplotlib missing or a drawing error: the run itself succeeded
        say(f"warning: no report.png ({type(exc).__name__}: {exc}); see `ia3 report {out} --debug`")
        return False
    return True


def _split_summary(report: Any) -> str:
    return ", ".join(f"{name} {n} rows" for name, n in report.splits.items())
