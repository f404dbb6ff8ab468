"""``ia3 serve``: the OpenAI-compatible server of many adapters on one base (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ia3cli.cli.common import DebugOpt, DeviceOpt, RayAddressOpt, RayOpt, check_ray, errors, quiet_libraries
from ia3cli.serving.settings import DEFAULTS as SERVE

SERVE_EXAMPLES = (
    "ia3 serve runs/                       # every run dir in runs/ is an adapter, by folder name",
    "ia3 serve runs/quickstart --port 8080",
    "ia3 serve adapters/ --max-adapters 1000 --max-batch-size 64 --api-key $KEY",
    "ia3 serve runs/ --device cuda:1        # a base with model.device_map: auto spreads over the GPUs",
    'curl localhost:8000/v1/completions -d \'{"model": "my-run", "prompt": "Hi", "max_tokens": 8}\'',
    "ia3 serve adapters/ --ray --replicas 2     # a local Ray cluster; each adapter goes to the replica holding it",
    "ia3 serve /shared/adapters --ray --ray-address auto --min-replicas 1 --max-replicas 8 --host 0.0.0.0",
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
    ray: RayOpt = False,
    replicas: Annotated[int | None, typer.Option("--replicas", help="With --ray: model replicas (default 1).")] = None,
    min_replicas: Annotated[
        int | None, typer.Option("--min-replicas", help="With --ray: autoscale on queue length, from this many...")
    ] = None,
    max_replicas: Annotated[int | None, typer.Option("--max-replicas", help="... up to this many replicas.")] = None,
    replica_cpus: Annotated[float, typer.Option("--replica-cpus", help="With --ray: CPUs each replica takes.")] = 1.0,
    ray_address: RayAddressOpt = None,
    device: DeviceOpt = "auto",
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

            serving.run(adapters, host=host, port=port, api_key=api_key, printer=typer.echo, device=device, **options)
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
            device=device,
        )
