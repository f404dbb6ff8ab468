"""``ia3 predict``: a file of rows through one or many adapters, mixed in every batch (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ia3cli.cli.common import DebugOpt, DeviceOpt, RayAddressOpt, RayOpt, check_ray, errors, quiet_libraries

PREDICT_EXAMPLES = (
    "ia3 predict runs/quickstart --input rows.jsonl --output preds.jsonl",
    "ia3 predict runs/ --input tickets.csv      # every run dir in runs/; rows pick one in column 'adapter'",
    "ia3 predict runs/a --adapter b=runs/b --input rows.parquet --on-error skip",
    "ia3 predict runs/chat --input prompts.jsonl --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 1",
    "ia3 predict runs/ --input rows.jsonl --device cpu      # default: the GPU when there is one",
    "ia3 predict runs/ --input big.parquet --ray --workers 4     # Ray Data: 4 actors, streamed, same output",
)


def predict(
    source: Annotated[
        Path | None,
        typer.Argument(
            help="A run dir, or a folder of run dirs (each an adapter named by its folder).",
            show_default=False,
            metavar="RUN_OR_ADAPTERS",
        ),
    ] = None,
    input_path: Annotated[
        Path, typer.Option("--input", "-i", help="Rows to predict: .jsonl, .csv or .parquet.", show_default=False)
    ] = ...,  # type: ignore[assignment]
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="JSON lines out (default: INPUT_STEM.predictions.jsonl beside the input)."),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", metavar="NAME=RUN_DIR", help="Another adapter, named NAME (repeatable)."),
    ] = None,
    adapter_column: Annotated[
        str, typer.Option("--adapter-column", help="Column naming each row's adapter (optional with one adapter).")
    ] = "adapter",
    choices_column: Annotated[
        str | None,
        typer.Option(
            "--choices-column",
            help="Column with a row's own choices (a list) to rank [default: the recipe's data.choices_column, "
            "else choices].",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward.")] = 16,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate per row.")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy; > 0: sample.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling.")] = 0,
    on_error: Annotated[
        str, typer.Option("--on-error", help="Bad rows: fail (write nothing) or skip (report them, predict the rest).")
    ] = "fail",
    ray: RayOpt = False,
    workers: Annotated[
        int | None, typer.Option("--workers", help="With --ray: actors, each with the base (default 1).")
    ] = None,
    ray_address: RayAddressOpt = None,
    device: DeviceOpt = "auto",
    debug: DebugOpt = False,
) -> None:
    """Predict a file of rows with one or many adapters (mixed in every batch); output keeps the input order."""
    with errors(debug):
        check_ray(ray, {"--workers": workers, "--ray-address": ray_address})
        quiet_libraries(debug)
        from ia3cli.inference.predict import predict as run_predict

        on_ray = {}
        if ray:
            from ia3cli.inference.ray_predict import predict_on_ray as run_predict

            on_ray = {"workers": workers or 1, "ray_address": ray_address}
        result = run_predict(
            source,
            input_path,
            output,
            **on_ray,
            adapters=adapter or [],
            adapter_column=adapter_column,
            choices_column=choices_column,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            on_error=on_error,
            printer=lambda line: typer.echo(line, err=True),
            device=device,
        )
        skipped = f", skipped {len(result.errors)} bad rows" if result.errors else ""
        typer.echo(f"{result.predicted} predictions written to {result.output}{skipped}")
