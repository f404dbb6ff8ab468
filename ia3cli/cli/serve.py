"""``ia3 serve``: the OpenAI-compatible server of many adapters on one base (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ia3cli.cli.common import DebugOpt, DeviceOpt, errors, quiet_libraries
from ia3cli.serving.settings import DEFAULTS as SERVE

SERVE_EXAMPLES = (
    "ia3 serve runs/                       # every run dir in runs/ is an adapter, by folder name",
    "ia3 serve runs/quickstart --port 8080",
    "ia3 serve adapters/ --max-adapters 1000 --max-batch-size 64 --api-key $KEY",
    "ia3 serve runs/ --device cuda:1        # a base with model.device_map: auto spreads over the GPUs",
    'curl localhost:8000/v1/completions -d \'{"model": "my-run", "prompt": "Hi", "max_tokens": 8}\'',
)


def serve(
    adapters: Annotated[
        Path,
        typer.Argument(help="A run dir, or a folder of run dirs (one adapter each).", show_default=False),
    ],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (0.0.0.0 exposes it to the network).")
    ] = SERVE.host,
    port: Annotated[int, typer.Option("--port", help="Port (0 picks a free one).")] = SERVE.port,
    max_adapters: Annotated[
        int, typer.Option("--max-adapters", help="Adapters kept loaded (LRU).")
    ] = SERVE.max_adapters,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Rows per batch.")] = SERVE.max_batch_size,
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", help="Longest wait for a batch to fill.")
    ] = SERVE.max_wait_ms,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="IA3_API_KEY", help="Require Authorization: Bearer KEY (env IA3_API_KEY)."),
    ] = None,
    device: DeviceOpt = "auto",
    debug: DebugOpt = False,
) -> None:
    """Serve a base model and its IA3 adapters over an OpenAI-compatible HTTP API, batching across adapters."""
    with errors(debug):
        quiet_libraries(debug)
        from ia3cli.serving import app as serving

        serving.run(
            adapters,
            host=host,
            port=port,
            max_adapters=max_adapters,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            api_key=api_key,
            printer=typer.echo,
            device=device,
        )
