"""The commands that use and compare adapters: ``ia3 predict``, ``ia3 compare`` and ``ia3 serve``.

Plain functions with their Typer arguments; ``ia3cli.cli.app`` registers them with their examples. Heavy libraries are
imported inside the bodies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ia3cli.cli.common import (
    DebugOpt,
    RayAddressOpt,
    RayOpt,
    RecipeArg,
    SetOpt,
    check_ray,
    errors,
    quiet_libraries,
)

PREDICT_EXAMPLES = (
    "ia3 predict runs/quickstart --input rows.jsonl --output preds.jsonl",
    "ia3 predict runs/ --input tickets.csv      # every run dir in runs/; rows pick one in column 'adapter'",
    "ia3 predict runs/a --adapter b=runs/b --input rows.parquet --on-error skip",
    "ia3 predict runs/chat --input prompts.jsonl --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 1",
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
        str, typer.Option("--choices-column", help="Column with a row's own choices (a list) to rank.")
    ] = "choices",
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
        )
        skipped = f", skipped {len(result.errors)} bad rows" if result.errors else ""
        typer.echo(f"{result.predicted} predictions written to {result.output}{skipped}")


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
    with errors(debug):
        from ia3cli.config.recipe import load_recipe
        from ia3cli.errors import RecipeError

        loaded = load_recipe(recipe, set_ or [])
        if lora_targets not in ("attention", "all-linear"):
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
        )


SERVE_EXAMPLES = (
    "ia3 serve runs/                       # every run dir in runs/ is an adapter, by folder name",
    "ia3 serve runs/quickstart --port 8080",
    "ia3 serve adapters/ --max-adapters 1000 --max-batch-size 64 --api-key $KEY",
    'curl localhost:8000/v1/completions -d \'{"model": "my-run", "prompt": "Hi", "max_tokens": 8}\'',
    "ia3 serve adapters/ --ray --replicas 2     # a local Ray cluster; each adapter goes to the replica holding it",
    "ia3 serve /shared/adapters --ray --ray-address auto --min-replicas 1 --max-replicas 8 --host 0.0.0.0",
)


def serve(
    adapters: Annotated[
        Path,
        typer.Argument(help="A run dir, or a folder of run dirs (one adapter each).", show_default=False),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0 exposes it to the network).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", help="Port (0 picks a free one).")] = 8000,
    max_adapters: Annotated[int, typer.Option("--max-adapters", help="Adapters kept loaded (LRU).")] = 64,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Rows per batch.")] = 32,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="Longest wait for a batch to fill.")] = 10.0,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="IA3_API_KEY", help="Require Authorization: Bearer KEY (env IA3_API_KEY)."),
    ] = None,
    ray: RayOpt = False,
    replicas: Annotated[int | None, typer.Option("--replicas", help="With --ray: model replicas (default 1).")] = None,
    min_replicas: Annotated[
        int | None, typer.Option("--min-replicas", help="With --ray: autoscale on queue length, from this many...")
    ] = None,
    max_replicas: Annotated[int | None, typer.Option("--max-replicas", help="... up to this many replicas.")] = None,
    replica_cpus: Annotated[float, typer.Option("--replica-cpus", help="With --ray: CPUs each replica takes.")] = 1.0,
    ray_address: RayAddressOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Serve a base model and its IA3 adapters over an OpenAI-compatible HTTP API, batching across adapters."""
    with errors(debug):
        ray_only = {"--replicas": replicas, "--min-replicas": min_replicas, "--max-replicas": max_replicas}
        check_ray(ray, {**ray_only, "--ray-address": ray_address})
        quiet_libraries(debug)
        options = {"max_adapters": max_adapters, "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms}
        if not ray:
            from ia3cli.serving import app as serving

            serving.run(adapters, host=host, port=port, api_key=api_key, printer=typer.echo, **options)
            return
        from ia3cli.serving import ray_deploy

        ray_deploy.run(
            adapters,
            ray_address=ray_address,
            printer=typer.echo,
            server_options=options,
            replica_scaling=ray_deploy.scaling(replicas, min_replicas, max_replicas, max_batch_size),
            replica_cpus=replica_cpus,
            host=host,
            port=port,
            api_key=api_key,
        )
