"""``ia3 serve --ray``: the same OpenAI-compatible app on a Ray cluster, one replica per model copy.

Ray Serve gives routing, replicas, autoscaling and restarts; ia3cli adds nothing of its own there. Two deployments:

- ``ia3-router`` (no CPU, the HTTP ingress): reads a request's ``model`` from the JSON body and forwards the
  request to the model deployment with ``handle.options(multiplexed_model_id=model)``. Ray Serve's multiplexing
  then prefers a replica that already holds that adapter, so each adapter lives on one replica (or a few, when
  one is busy) instead of every one. It also answers ``/health`` and ``/metrics`` for all replicas together.
- ``ia3-replica`` (one base model each): runs the unchanged app of :mod:`ia3cli.serving.app` (its endpoints, its
  errors, its batcher mixing adapters in one forward) on the replica's event loop, fed the forwarded request as
  ASGI messages. A replica's adapters are Ray's multiplexed models: ``@serve.multiplexed`` keeps at most
  ``--max-adapters`` per replica (LRU) and tells the routers which replica holds which; an adapter it evicts is
  unloaded from the replica's stacks.

A replica that dies is restarted by Ray Serve; requests it was answering get 503, the others go on. Replicas push
their metrics to a board actor twice a second: ``/metrics`` shows them with a ``replica`` label, ``/health`` lists
the live ones. Not on Ray: ``POST``/``DELETE /adapters`` (a registration would live in one replica); put the run
dir in the adapter directory, which (like the base model) must be at the same path on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import MultiplexMixin, PendingRequest, RequestRouter, RunningReplica
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ia3cli.errors import Ia3Error
from ia3cli.serving.adapter_pool import AdapterNotFound, first_run, run_dir_named
from ia3cli.serving.completions import ApiError, check_key, error_body
from ia3cli.serving.prometheus import Metrics

APP_NAME = "ia3"
REPORT_EVERY_S = 0.5
QUIET = {"log_level": "WARNING"}  # no access log line per request, as `ia3 serve` in one process
FRESH_S = 3.0  # a replica not heard from for this long is left out of /health and /metrics
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers")
# the errors of a replica that died or cannot be reached: the request may be retried (HTTP 503)
UNAVAILABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
UNAVAILABLE += (serve.exceptions.BackPressureError, serve.exceptions.DeploymentUnavailableError)


class AdapterRouter(MultiplexMixin, RequestRouter):
    """Ray Serve's request routing for the replicas: power of two choices among the replicas holding the adapter.

    The candidates are Ray's own multiplex ranking (the replicas holding the model id; after a short timeout or
    when they are busy, those holding the fewest; then all). Unlike Ray's default router, a replica chosen for a
    request goes to that request: the default hands it to the oldest waiting request, whatever its adapter, which
    then loads that adapter on a second replica.
    """

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            wanted = self.apply_multiplex_routing(pending_request=pending_request)
            candidate_replicas = [r for r in candidate_replicas if r.replica_id in wanted]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]


class Board:
    """Each replica's last report: ``replica id -> (time, pid, base name, metrics snapshot)``."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, int, str, Any]] = {}

    def put(self, replica: str, pid: int, base: str, snapshot: Any) -> None:
        self.reports[replica] = (time.time(), pid, base, snapshot)

    def fresh(self, within_s: float) -> dict[str, tuple[float, int, str, Any]]:
        now = time.time()
        self.reports = {r: v for r, v in self.reports.items() if now - v[0] < 60}
        return {r: v for r, v in self.reports.items() if now - v[0] < within_s}


class _Loaded:
    """What Ray's multiplexer holds for one adapter; Ray calls ``__del__`` when it evicts it."""

    def __init__(self, replica: Replica, name: str) -> None:
        self.replica, self.name, self.unloaded = replica, name, False

    def __del__(self) -> None:
        if self.unloaded:  # Ray calls it on eviction, the garbage collector once more later
            return
        self.unloaded = True
        with contextlib.suppress(RuntimeError):  # the model thread is gone: the replica is shutting down
            self.replica.server.batcher.on_model_thread(self.replica.server.pool.unload, self.name)


class Replica:
    """One base model with its adapters, serving the app of :mod:`ia3cli.serving.app` to the router.

    Args:
        path: The adapter directory (a run dir or a folder of run dirs), the same path on every node.
        options: :class:`~ia3cli.serving.app.Server` keywords (``max_adapters``, ``max_batch_size``, ...).
        board: The :class:`Board` actor this replica reports to.
    """

    def __init__(self, path: str, options: dict[str, Any], board: Any) -> None:
        from ia3cli.serving import app as serving

        options = dict(options)  # the Server's keywords, and the device (--device) the base loads on
        mixed, root, loaded = serving.load(Path(path), device=options.pop("device", "auto"))
        self.server = serving.Server(mixed, root, loaded=loaded, **options)
        self.app = serving.build_app(self.server)
        self.board = board
        self.id = serve.get_replica_context().replica_id.unique_id

        async def load(name: str) -> _Loaded:  # a plain function: Ray keeps its LRU as an attribute of it
            return await self._load(name)

        self.adapter = serve.multiplexed(max_num_models_per_replica=self.server.pool.max_adapters)(load)
        self._stack: contextlib.AsyncExitStack | None = None
        self._reporter: asyncio.Task | None = None

    async def _load(self, name: str) -> _Loaded:
        failed = await self.server.batcher.call(self.server.pool.ensure, {name})
        if name in failed:
            raise failed[name]
        return _Loaded(self, name)

    async def _start(self) -> None:
        """Start the app's lifespan (its batcher) on this replica's event loop, once."""
        if self._stack is None:
            self._stack = contextlib.AsyncExitStack()
            await self._stack.enter_async_context(self.app.router.lifespan_context(self.app))
            self._reporter = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a lost report is replaced by the next one
                snapshot = self.server.metrics.snapshot()
                await self.board.put.remote(self.id, os.getpid(), self.server.mixed.base_name, snapshot)
            await asyncio.sleep(REPORT_EVERY_S)

    async def check_health(self) -> None:
        await self._start()

    async def forward(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any]]:
        """Run one request through the app; yield its ASGI messages (response start, then body parts)."""
        await self._start()
        name = serve.get_multiplexed_model_id()
        if name:
            with contextlib.suppress(AdapterNotFound):  # an unknown name: the app answers 404
                self.server.pool.find(name)
                with contextlib.suppress(Ia3Error):  # a broken adapter: the app's batch reports it
                    await self.adapter(name)
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        request = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if request:
                return request.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.get_running_loop().create_task(self.app(dict(scope), receive, messages.put))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                yield message
        finally:  # done, or the client went away (Ray cancels this generator): the app frees its rows
            gone.set()
            if not task.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, timeout=5)


class Router:
    """The HTTP ingress: forward each request to a replica chosen by its ``model`` (Ray's multiplexed model id).

    Args:
        replicas: The handle of the ``ia3-replica`` deployment.
        board: The :class:`Board` actor the replicas report to.
        api_key: Required on ``/metrics`` as on the app's endpoints, when set.
        root: The adapter directory (only its adapters' names become multiplexed model ids).
    """

    def __init__(self, replicas: Any, board: Any, api_key: str | None, root: str) -> None:
        self.replicas, self.board, self.api_key, self.root = replicas, board, api_key, Path(root)

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        try:
            if path == "/health" and method == "GET":
                return await self._health()
            if path == "/metrics" and method == "GET":
                check_key(self.api_key, request.headers.get("authorization", ""))
                return await self._metrics()
            if path.startswith("/adapters") and method in ("POST", "DELETE"):
                raise ApiError(
                    501,
                    "adapters cannot be registered at run time on a Ray deployment (a registration would live in "
                    "one replica); put the run dir in the adapter directory: every replica hot-loads it by name",
                    "not_supported_on_ray",
                )
        except ApiError as exc:
            return JSONResponse(error_body(exc.status, exc.message, exc.code, exc.param), exc.status)
        return await self._forward(request)

    async def _forward(self, request: Request) -> Response:
        body = await request.body()
        model = _model_of(body, request.headers.get("serve_multiplexed_model_id"))
        if model and run_dir_named(self.root, model) is None:  # route only adapters: Ray remembers every id it saw
            model = None
        scope = {k: request.scope[k] for k in SCOPE_KEYS if k in request.scope}
        handle = self.replicas.options(stream=True, multiplexed_model_id=model or "")
        stream = handle.forward.remote(scope, body)
        try:
            start = await stream.__anext__()
            first = await stream.__anext__()
        except UNAVAILABLE as exc:
            stream.cancel()
            return _unavailable(exc)
        except StopAsyncIteration:
            first = {"body": b"", "more_body": False}
        if not first.get("more_body"):
            response = Response(first.get("body", b""), start["status"])
            response.raw_headers = list(start.get("headers", []))
            return response

        async def rest() -> AsyncIterator[bytes]:
            try:
                yield first.get("body", b"")
                async for message in stream:
                    yield message.get("body", b"")
            except UNAVAILABLE as exc:  # the status is sent: report in the stream, as the app does
                yield f"data: {json.dumps(_unavailable_body(exc))}\n\n".encode()
            finally:
                stream.cancel()

        response = StreamingResponse(rest(), start["status"])
        response.raw_headers = list(start.get("headers", []))
        return response

    async def _reports(self) -> dict[str, tuple[float, int, str, Any]]:
        return await self.board.fresh.remote(FRESH_S)

    async def _health(self) -> Response:
        reports = await self._reports()
        replicas = [
            {"replica": r, "pid": pid, "adapters_loaded": int(snap[0].get(("ia3_adapters_loaded", ()), 0))}
            for r, (_, pid, _, snap) in sorted(reports.items())
        ]
        base = next((b for _, _, b, _ in reports.values()), None)
        body = {"status": "ok" if replicas else "unavailable", "base": base, "replicas": replicas}
        body["adapters_loaded"] = sum(r["adapters_loaded"] for r in replicas)
        return JSONResponse(body, 200 if replicas else 503)

    async def _metrics(self) -> Response:
        merged = Metrics()
        for replica, (_, _, _, snapshot) in sorted((await self._reports()).items()):
            merged.absorb(snapshot, replica=replica)
        return PlainTextResponse(merged.render())


def _model_of(body: bytes, header: str | None) -> str | None:
    """A request's adapter: the ``serve_multiplexed_model_id`` header, else the JSON body's ``model``."""
    if header:
        return header
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


def _unavailable_body(exc: BaseException) -> dict[str, Any]:
    message = f"the replica answering this request is unavailable ({type(exc).__name__}); retry"
    return error_body(503, message, "replica_unavailable")


def _unavailable(exc: BaseException) -> Response:
    return JSONResponse(_unavailable_body(exc), 503, headers={"Retry-After": "1"})


def scaling(replicas: int | None, min_replicas: int | None, max_replicas: int | None, target: int) -> dict[str, Any]:
    """Ray Serve's ``num_replicas`` or ``autoscaling_config`` for the replica deployment.

    Raises:
        Ia3Error: for a fixed count together with bounds, or bounds out of order.
    """
    if min_replicas is None and max_replicas is None:
        count = 1 if replicas is None else replicas
        if count < 1:
            raise Ia3Error(f"--replicas {count}: must be >= 1")
        return {"num_replicas": count}
    if replicas is not None:
        raise Ia3Error("--replicas is a fixed count; --min-replicas/--max-replicas autoscale", "pass one or the other")
    low, high = min_replicas if min_replicas is not None else 1, max_replicas if max_replicas is not None else 1
    if not 0 <= low <= high or high < 1:
        raise Ia3Error(f"--min-replicas {low} --max-replicas {high}: need 0 <= min <= max and max >= 1")
    # queue length: scale out when a replica holds more than one full batch of requests, in again when idle
    config = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target}
    return {"autoscaling_config": config}


def deploy(
    path: Path,
    *,
    server_options: dict[str, Any],
    replica_scaling: dict[str, Any],
    replica_cpus: float = 1.0,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str = "auto",
) -> str:
    """Start Ray Serve on the connected cluster and run the router and the replicas; the URL they answer on.

    Raises:
        Ia3Error: for a bad adapter directory, or a deployment whose replicas cannot start.
    """
    from ia3cli.serving.app import bind, check_options

    root = Path(path).resolve()
    first_run(root)  # the checks of `ia3 serve` before anything starts on the cluster
    check_options(**server_options)
    if port == 0:  # the proxy needs a number: a free one
        with contextlib.closing(bind(host, 0)) as sock:
            port = sock.getsockname()[1]
    board = ray.remote(num_cpus=0)(Board).remote()
    busy = 2 * server_options.get("max_batch_size", 32)  # requests a replica takes at once: two batches' worth
    replica = serve.deployment(
        Replica,
        name="ia3-replica",
        max_ongoing_requests=busy,
        ray_actor_options={"num_cpus": replica_cpus},
        health_check_period_s=2,
        graceful_shutdown_timeout_s=5,
        request_router_config=RequestRouterConfig(request_router_class=AdapterRouter),
        logging_config=QUIET,
        **replica_scaling,
    )
    no_cpu, quick_stop = {"num_cpus": 0}, 5  # Ctrl-C: in-flight requests get 5 s, then replicas go
    router = serve.deployment(Router, name="ia3-router", max_ongoing_requests=10_000, ray_actor_options=no_cpu,
                              graceful_shutdown_timeout_s=quick_stop, logging_config=QUIET)  # fmt: skip
    serve.start(http_options={"host": host, "port": port})
    try:
        replicas = replica.bind(str(root), {**server_options, "api_key": api_key, "device": device}, board)
        serve.run(router.bind(replicas, board, api_key, str(root)), name=APP_NAME)
    except RuntimeError as exc:
        raise Ia3Error(f"the Ray Serve deployment did not start: {exc}", "see the replica logs above") from None
    return f"http://{host}:{port}"


def run(path: Path, *, ray_address: str | None, printer: Callable[[str], None] = print, **options: Any) -> None:
    """``ia3 serve --ray``: connect (or start a local cluster), deploy, serve until Ctrl-C or SIGTERM, then tear down
    (the replicas drain their requests first).

    Raises:
        Ia3Error: for an unreachable cluster, a bad adapter directory or a deployment that cannot start.
    """
    from ia3cli.serving.app import check_options

    first_run(Path(path))
    check_options(**options["server_options"])
    try:
        ray.init(address=ray_address, logging_level="WARNING")
    except (ConnectionError, ValueError) as exc:
        hint = "start one with `ray start --head`, or leave out --ray-address for a local cluster"
        raise Ia3Error(f"--ray-address {ray_address}: cannot connect: {exc}", hint) from None
    try:
        if ray_address is None:  # a local cluster cannot grow: replicas that do not fit would wait forever
            count = options["replica_scaling"].get("num_replicas") or 1
            need, have = count * options.get("replica_cpus", 1.0), ray.cluster_resources().get("CPU", 0)
            if need > have:
                hint = "lower --replicas or --replica-cpus, or join a bigger cluster with --ray-address"
                raise Ia3Error(f"{count} replica(s) need {need:g} CPUs; the local Ray cluster has {have:g}", hint)
        url = deploy(path, **options)
        printer(f"serving {Path(path)} on Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs) at {url}")
        # SIGTERM, how Kubernetes, SLURM and systemd stop a server, does what Ctrl-C does: KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        printer("stopping")
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        ray.shutdown()
