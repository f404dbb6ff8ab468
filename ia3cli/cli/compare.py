"""``ia3 compare``: IA3 next to the other methods on the same rows (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ia3cli.cli.common import DebugOpt, DeviceOpt, RecipeArg, SetOpt, errors, quiet_libraries


def _int_list(text: str, option: str) -> list[int]:
    from ia3cli.errors import RecipeError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(option, f"'{text}' is not a comma-separated list of integers", "e.g. 16,64,256") from None


COMPARE_EXAMPLES = (
    "ia3 compare recipes/quickstart.yaml --rows 16,64 --seeds 3",
    "ia3 compare recipes/quickstart-causal.yaml --methods zero-shot,icl,ia3,lora --rows 16,64 --seeds 2",
    "ia3 compare recipe.yaml --methods ia3,lora --lora-r 8 --lr lora=1e-3 --out runs/cmp",
    "ia3 compare recipe.yaml --sweep --set data.eval_samples=200",
    "ia3 compare recipe.yaml --out runs/cmp --resume      # skip the cells already finished",
    "ia3 compare recipe.yaml --methods zero-shot,icl --device cuda:0",
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
    lora_r: Annotated[
        int | None, typer.Option("--lora-r", min=1, help="LoRA rank [default: the recipe's adapter.lora_r].")
    ] = None,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            "--lora-targets",
            help="attention (query/value projections) or all-linear [default: the recipe's adapter.lora_targets].",
        ),
    ] = None,
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
    device: DeviceOpt = "auto",
    debug: DebugOpt = False,
) -> None:
    """Train and evaluate IA3 next to LoRA, full fine-tuning, a linear probe, zero-shot and in-context learning on
    the same rows; print a table, write compare.json and compare.png."""
    with errors(debug):
        from ia3cli.config.load import load_recipe
        from ia3cli.errors import RecipeError

        loaded = load_recipe(recipe, set_ or [])
        if lora_targets not in (None, "attention", "all-linear"):
            raise RecipeError("--lora-targets", f"'{lora_targets}' is not attention or all-linear")
        quiet_libraries(debug)
        from ia3cli.compare import run as comparing

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
            device=device,
        )
