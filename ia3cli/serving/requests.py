"""The request bodies of ``ia3 serve``'s OpenAI-compatible endpoints, as pydantic models (a bad body is a 422 that
names the field)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

MAX_INPUTS = 256  # prompts or inputs in one request (each is a row of a batch)


class _Sampling(BaseModel):
    model: str
    max_tokens: int = Field(16, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = Field(False, description="Generate max_tokens whatever comes (vLLM's extension).")


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ClassifyRequest(BaseModel):
    model: str
    input: str | Annotated[list[str | dict[str, Any]], Field(min_length=1, max_length=MAX_INPUTS)]


class AdapterRequest(BaseModel):
    name: str
    path: str
