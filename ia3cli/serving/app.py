"""``ia3 serve``: one base model, many IA3 adapters, an OpenAI-compatible HTTP API, requests batched across adapters.

An IA3 adapter is kilobytes to a few MB, so one base can hold thousands (one per user, customer or task). PEFT
switches adapters per model (``set_adapter``), which serialises requests; LLM servers (vLLM, TGI, LoRAX) serve LoRA
only. Here each row of a batch uses its own adapter's vectors in one forward (:mod:`ia3cli.tuners.mixed`), so requests
for different adapters share a batch (:mod:`ia3cli.serving.batcher`).

Endpoints (``model`` is an adapter name, or the base model's own name for the base):

- ``POST /v1/completions``, ``POST /v1/chat/completions``: OpenAI's request and response shapes, ``stream: true``
  as server-sent events (``data: {...}`` chunks, then ``data: [DONE]``); ``temperature`` 0 is greedy; ``stop``,
  ``seed`` and vLLM's ``ignore_eos`` are honoured.
- ``POST /v1/classify``: ``{"model", "input": str | [str] | [{column: value}]}`` -> label and probabilities per
  input, for seq-cls adapters (their head) and choice adapters (rank classification over ``data.label_names``, or
  each input's own list in the ``data.choices_column`` field).
- ``GET /v1/models``; ``POST /adapters {"name", "path"}`` (the path must resolve inside the adapter directory);
  ``DELETE /adapters/{name}``; ``GET /health``; ``GET /metrics`` (Prometheus text format).

Adapters hot-load on first use from the adapter directory and live in an LRU bounded by ``--max-adapters``.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 401 wrong API key, 403 path outside
the adapter directory, 404 unknown adapter, 413 prompt too long, 422 malformed body.

Modules: this one (the app, its endpoints, the command), :mod:`ia3cli.serving.completions` (completion responses, SSE),
:mod:`ia3cli.serving.batcher` (batching, the generation step loop), :mod:`ia3cli.serving.adapter_pool` (names,
paths, LRU),
:mod:`ia3cli.serving.prometheus` (the /metrics text), :mod:`ia3cli.serving.ray_deploy` (this app as a Ray Serve
deployment, ``--ray``).

Why FastAPI + uvicorn: they are what Python model servers standardise on (vLLM's and TGI's OpenAI-compatible
routers are FastAPI apps), pydantic request models give 422s naming the bad field for free, and uvicorn's asyncio
loop holds thousands of idle streaming connections while the model works on its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ia3cli.errors import Ia3Error
from ia3cli.models.device import input_device
from ia3cli.serving.adapter_pool import AdapterNotFound, AdapterPool, first_run
from ia3cli.serving.batcher import DEGRADED_AFTER, Batcher, ClassifyItem
from ia3cli.serving.completions import ApiError, check_key, error_body, from_ia3, respond
from ia3cli.serving.prometheus import Metrics
from ia3cli.serving.requests import AdapterRequest, ChatRequest, ClassifyRequest, CompletionRequest
from ia3cli.serving.settings import DEFAULTS

if TYPE_CHECKING:
    from ia3cli.tuners.mixed import MixedIA3


# --- the app -------------------------------------------------------------------------------------------------------


class Server:
    """What the endpoints share: the model, the adapter pool, the batcher, the metrics.

    Args:
        mixed: The base with its adapters.
        root: The adapter directory.
        max_adapters: LRU bound.
        max_batch_size: Rows per batch.
        max_wait_ms: Longest wait for a batch to fill.
        api_key: Required as ``Authorization: Bearer KEY`` on every endpoint but /health, when set.
        loaded: Adapters ``mixed`` holds already, with their run dirs.
    """

    def __init__(
        self,
        mixed: MixedIA3,
        root: Path,
        *,
        max_adapters: int = DEFAULTS.max_adapters,
        max_batch_size: int = DEFAULTS.max_batch_size,
        max_wait_ms: float = DEFAULTS.max_wait_ms,
        api_key: str | None = None,
        loaded: dict[str, Path] | None = None,
    ) -> None:
        self.mixed = mixed
        self.metrics = Metrics()
        self.pool = AdapterPool(mixed, root, max_adapters, self.metrics, loaded or {})
        self.batcher = Batcher(mixed, self.pool, self.metrics, max_batch_size, max_wait_ms)
        self.api_key = api_key
        config = mixed.model.config
        self.context = int(getattr(config, "max_position_embeddings", 0) or mixed.tokenizer.model_max_length)

    def adapter_of(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (``None`` for the base).

        Raises:
            ApiError: 404 for an unknown name.
        """
        if model == self.mixed.base_name:
            return None
        try:
            self.pool.find(model)
        except AdapterNotFound as exc:
            raise ApiError(404, str(exc), "model_not_found", "model") from None
        return model

    def encode(self, text: str, max_tokens: int, *, special: bool = True) -> list[int]:
        """Token ids of a prompt that leaves room for ``max_tokens`` in the context.

        Raises:
            ApiError: 413 when prompt plus ``max_tokens`` exceed the model's context.
        """
        ids = self.mixed.tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) + max_tokens > self.context:
            raise ApiError(
                413,
                f"prompt is {len(ids)} tokens; with max_tokens {max_tokens} that exceeds the context of "
                f"{self.context} tokens",
                "context_length_exceeded",
                "prompt",
            )
        return ids


class _Measure:
    """ASGI middleware: count requests by route and status, and time each to its last byte (streams included)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), ["500"]

        async def measured(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, measured)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.inc("ia3_requests_total", endpoint=endpoint, code=status[0])
            self.metrics.observe("ia3_request_duration_seconds", time.perf_counter() - t0, endpoint=endpoint)


def build_app(server: Server) -> FastAPI:
    """The FastAPI app for ``server`` (its batcher starts and stops with the app)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        yield
        await server.batcher.stop()

    app = FastAPI(title="ia3 serve", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_Measure, metrics=server.metrics)
    _error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok", "base": server.mixed.base_name, "adapters_loaded": len(server.pool.lru)}
        failing = server.batcher.failures_in_a_row
        if failing >= DEGRADED_AFTER:  # the model itself fails: tell the load balancer
            body |= {"status": "degraded", "failed_batches_in_a_row": failing, "last_error": server.batcher.last_error}
        return JSONResponse(body, status_code=503 if body["status"] == "degraded" else 200)

    async def authorised(request: Request) -> None:
        check_key(server.api_key, request.headers.get("authorization", ""))

    app.include_router(_admin_routes(server), dependencies=[Depends(authorised)])
    app.include_router(_model_routes(server), dependencies=[Depends(authorised)])
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-shaped body: ours, the request validation's (422) and Starlette's (404, 405)."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.code, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body(422, message or "malformed body", "invalid_body", where or None), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


def _admin_routes(server: Server) -> APIRouter:
    """``/metrics``, ``/v1/models`` and registering or removing adapters at run time."""
    api = APIRouter()

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return server.metrics.render()

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [server.mixed.base_name, *server.pool.known()]
        data = [
            {"id": n, "object": "model", "owned_by": "ia3cli", "loaded": i == 0 or n in server.pool.lru}
            for i, n in enumerate(names)
        ]
        return {"object": "list", "data": data}

    @api.post("/adapters", status_code=201)
    async def add_adapter(body: AdapterRequest) -> dict[str, Any]:
        try:
            return await server.batcher.call(server.pool.register, body.name, body.path)
        except Ia3Error as exc:
            raise from_ia3(exc) from None

    @api.delete("/adapters/{name}")
    async def remove_adapter(name: str) -> dict[str, Any]:
        try:
            await server.batcher.call(server.pool.unregister, name)
        except Ia3Error as exc:
            raise from_ia3(exc) from None
        return {"name": name, "deleted": True}

    return api


def _model_routes(server: Server) -> APIRouter:
    """The OpenAI-compatible model endpoints: ``/v1/classify``, ``/v1/completions``, ``/v1/chat/completions``."""
    api = APIRouter()

    @api.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        adapter = server.adapter_of(body.model)
        rows = [body.input] if isinstance(body.input, str) else body.input
        for row in rows:
            for value in row.values() if isinstance(row, dict) else [row]:
                server.encode(str(value), 0)
        loop = asyncio.get_running_loop()
        item = ClassifyItem(adapter, rows, loop, loop.create_future())
        server.batcher.submit_classify(item)
        try:
            result = await item.future
        except Ia3Error as exc:
            raise from_ia3(exc) from None
        data = []
        for i, (labels, probs) in enumerate(zip(result["labels"], result["probabilities"], strict=True)):
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": i, "label": labels[best], "probabilities": dict(zip(labels, probs, strict=True))})
        return {"object": "list", "model": body.model, "data": data}

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        adapter = server.adapter_of(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        ids = [server.encode(p, body.max_tokens) for p in prompts]
        return await respond(server.mixed, server.batcher, request, body, adapter, ids, chat=False)

    @api.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        adapter = server.adapter_of(body.model)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        tok = server.mixed.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, f"model '{body.model}' has no chat template; use /v1/completions", "no_chat_template")
        text = tok.apply_chat_template(
            [m.model_dump() for m in body.messages], tokenize=False, add_generation_prompt=True
        )
        ids = [server.encode(text, body.max_tokens, special=False)]
        return await respond(server.mixed, server.batcher, request, body, adapter, ids, chat=True)

    return api


# --- the command ---------------------------------------------------------------------------------------------------


def load(path: Path, quantization: str | None = None, device: str = "auto") -> tuple[MixedIA3, Path, dict[str, Path]]:
    """The base model and the adapter directory for ``ia3 serve PATH`` (a run dir, or a folder of run dirs).

    The base is the one the first run dir (by name) was trained on, loaded on ``device`` (``--device``); that
    adapter is loaded with it.

    Raises:
        Ia3Error: when PATH is missing or holds no run dir.
    """
    from ia3cli.models.device import resolve
    from ia3cli.tuners.mixed import MixedIA3

    resolve(device)  # a device that is not there fails before the model loads
    path = Path(path)
    first = first_run(path)
    mixed = MixedIA3.from_run(first, quantization=quantization, device=device)
    return mixed, path, {first.name: first.resolve()}


def check_options(max_adapters: int, max_batch_size: int, max_wait_ms: float) -> None:
    """Raises: Ia3Error for bounds out of range."""
    if max_adapters < 1 or max_batch_size < 1 or max_wait_ms < 0:
        raise Ia3Error("--max-adapters and --max-batch-size must be >= 1, --max-wait-ms >= 0")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0 picks a free one).

    Raises:
        Ia3Error: when the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Ia3Error(f"cannot listen on {host}:{port}: {exc.strerror}", "choose another --port") from None
    sock.listen(2048)
    return sock


def run(
    path: Path,
    *,
    host: str = DEFAULTS.host,
    port: int = DEFAULTS.port,
    max_adapters: int = DEFAULTS.max_adapters,
    max_batch_size: int = DEFAULTS.max_batch_size,
    max_wait_ms: float = DEFAULTS.max_wait_ms,
    api_key: str | None = None,
    printer: Callable[[str], None] = print,
    device: str = "auto",
) -> None:
    """Load the base and the first adapter on ``device``, bind, and serve until interrupted.

    Raises:
        Ia3Error: for a bad adapter directory or an address that cannot be bound.
    """
    import uvicorn

    check_options(max_adapters, max_batch_size, max_wait_ms)
    mixed, root, loaded = load(path, device=device)
    server = Server(
        mixed,
        root,
        max_adapters=max_adapters,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        api_key=api_key,
        loaded=loaded,
    )
    sock = bind(host, port)
    where = sock.getsockname()
    on = input_device(mixed.model)
    printer(f"serving {mixed.base_name} ({mixed.task}, {on}) with adapters from {root} on http://{host}:{where[1]}")
    printer(f"  adapters: {', '.join(server.pool.known()[:5])}{' ...' if len(server.pool.known()) > 5 else ''}")
    config = uvicorn.Config(build_app(server), log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
