"""OpenAI completion responses for ``ia3 serve``: queue one row per prompt, gather tokens into text, stream SSE.

Text is decoded from all of a row's tokens each time (a token may end inside a multi-byte character); stop strings
are applied to the decoded text, and a row that meets one, or whose client goes away, is cancelled (the batch drops
it at its next step). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ia3cli.errors import Ia3Error
from ia3cli.serving.adapter_pool import AdapterNotFound, BadInput, PathOutside
from ia3cli.serving.batcher import Batcher, Row

if TYPE_CHECKING:
    from ia3cli.tuners.mixed import MixedIA3


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def check_key(api_key: str | None, authorization: str) -> None:
    """Refuse a request whose ``Authorization: Bearer KEY`` header does not carry ``api_key`` (when one is set).

    Raises:
        ApiError: 401.
    """
    if api_key is None:
        return
    given = authorization.removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "incorrect API key (send Authorization: Bearer KEY)", "invalid_api_key")


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_ia3(exc: BaseException) -> ApiError:
    """The HTTP status and message for an error raised while serving (404 unknown adapter, 403 path escape...)."""
    status = {AdapterNotFound: 404, PathOutside: 403, BadInput: 422}.get(
        type(exc), 400 if isinstance(exc, Ia3Error) else 500
    )
    code = {404: "model_not_found", 403: "path_outside_adapter_dir"}.get(status)
    if isinstance(exc, Ia3Error):
        return ApiError(status, exc.message + (f" (hint: {exc.hint})" if exc.hint else ""), code)
    return ApiError(status, f"{type(exc).__name__}: {exc}", code)


async def respond(
    mixed: MixedIA3,
    batcher: Batcher,
    request: Request,
    body: Any,
    adapter: str | None,
    prompts: list[list[int]],
    *,
    chat: bool,
) -> Any:
    """Queue one row per prompt; answer with one JSON body, or stream server-sent events.

    Args:
        mixed: The model (its task and tokenizer).
        batcher: Where the rows are queued.
        request: The HTTP request (polled for a client that went away).
        body: The validated completion or chat request.
        adapter: The adapter of every row (``None``: the base).
        prompts: Token ids of each prompt.
        chat: Answer in the chat-completion shape.

    Raises:
        ApiError: for a model that does not generate, or a batch that failed before the first token.
    """
    if mixed.task != "causal-lm":
        raise ApiError(400, f"model '{body.model}' is a {mixed.task} model; use /v1/classify", "wrong_task")
    loop = asyncio.get_running_loop()
    rows = [
        Row(adapter, ids, body.max_tokens, body.temperature, body.top_p, body.seed, body.ignore_eos, loop)
        for ids in prompts
    ]
    batcher.submit_rows(rows)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    reply = _Reply(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time()), body.model, chat)
    if body.stream:
        return await _stream(mixed, request, rows, stops, reply)
    return await _whole(mixed, request, rows, stops, reply)


@dataclass
class _Reply:
    """What every response body (or stream chunk) of one request shares."""

    id: str
    created: int
    model: str
    chat: bool

    def head(self, *, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.chat else ""), "created": self.created}

    def choice(self, index: int, text: str, finish: str | None, *, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        content = {"role": "assistant", "content": text}
        return {"index": index, ("delta" if delta else "message"): content, "finish_reason": finish}


async def _stream(mixed: MixedIA3, request: Request, rows: list[Row], stops: list[str], reply: _Reply) -> Any:
    """Server-sent events, one per decoded piece of text, then ``[DONE]``."""
    pieces = _merge(mixed.tokenizer, request, rows, stops)
    try:  # an adapter that fails to load is known with the first event: answer it with its status code
        first = await anext(pieces)
    except StopAsyncIteration:
        first = None
    except BaseException:
        for row in rows:
            row.cancelled = True
        raise

    async def events() -> AsyncIterator[str]:
        try:
            piece = first
            while piece is not None:
                index, text, finish = piece
                chunk = reply.head(chunk=True) | {"model": reply.model}
                chunk["choices"] = [reply.choice(index, text, finish, delta=True)]
                yield f"data: {json.dumps(chunk)}\n\n"
                piece = await anext(pieces, None)
            yield "data: [DONE]\n\n"
        except ApiError as exc:  # after the first event the status is sent: report in the stream
            yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.code))}\n\n"
        finally:  # the client went away (or we are done): free every row still generating
            for row in rows:
                row.cancelled = True

    return StreamingResponse(events(), media_type="text/event-stream")


async def _whole(mixed: MixedIA3, request: Request, rows: list[Row], stops: list[str], reply: _Reply) -> dict[str, Any]:
    """One JSON body with every row's text, finish reason and the token usage."""
    texts = [""] * len(rows)
    finishes: list[str | None] = [None] * len(rows)
    try:
        async for index, text, finish in _merge(mixed.tokenizer, request, rows, stops):
            texts[index] += text
            finishes[index] = finish or finishes[index]
    finally:
        for row in rows:
            row.cancelled = True
    usage_prompt = sum(len(r.prompt_ids) for r in rows)
    usage_completion = sum(_count(mixed.tokenizer, t) for t in texts)
    return reply.head(chunk=False) | {
        "model": reply.model,
        "choices": [reply.choice(i, texts[i], finishes[i], delta=False) for i in range(len(rows))],
        "usage": {
            "prompt_tokens": usage_prompt,
            "completion_tokens": usage_completion,
            "total_tokens": usage_prompt + usage_completion,
        },
    }


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


async def _merge(
    tok: Any, request: Request, rows: list[Row], stops: list[str]
) -> AsyncIterator[tuple[int, str, str | None]]:
    """``(row index, new text, finish reason or None)`` as tokens arrive, with stop strings applied.

    Text is decoded from all of a row's tokens each time (a token may end inside a multi-byte character); with
    stop strings, the last ``len(longest stop) - 1`` characters are held back until they cannot start a stop.
    """
    hold = max((len(s) for s in stops), default=1) - 1
    ids: list[list[int]] = [[] for _ in rows]
    sent = [0] * len(rows)
    open_rows = set(range(len(rows)))
    queues = {asyncio.ensure_future(rows[i].out.get()): i for i in open_rows}
    while queues:
        done, _ = await asyncio.wait(queues, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            if await request.is_disconnected():
                for task in queues:
                    task.cancel()
                return
            continue
        for task in done:
            i = queues.pop(task)
            kind, value = task.result()
            if kind == "error":
                for other in queues:
                    other.cancel()
                raise from_ia3(value)
            finish = None
            if kind == "token":
                ids[i].append(value)
            else:
                finish = value
            text = tok.decode(ids[i], skip_special_tokens=True)
            found = [at for at in (text.find(s) for s in stops) if at >= 0]
            if found:
                cut = min(found)
                text, finish = text[:cut], "stop"
                rows[i].cancelled = True
            upto = len(text) if finish else len(text) - hold
            if text.endswith("\ufffd") and not finish:
                upto = min(upto, len(text) - 1)
            if upto > sent[i] or finish:
                yield i, text[sent[i] : max(upto, sent[i])], finish
                sent[i] = max(upto, sent[i])
            if finish is None:
                queues[asyncio.ensure_future(rows[i].out.get())] = i
