"""`ia3 serve` continuous batching and failing batches, over a real loopback server (tests/test_serve.py's
`serving`): short requests join a long running batch and finish first with PEFT's greedy tokens; batches that
raise inside the real model are counted in /metrics and turn /health into 503 until one succeeds."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.test_serve import NAMES, complete, make_adapters, metrics, reference_generate, serving

LONG = 150  # tokens of the background request (tiny model: a few ms each)
SHORT = 6


@pytest.fixture(scope="module")
def root(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapters(tmp_path_factory.mktemp("batching"), tiny_model("llama", "causal-lm"), "causal-lm", NAMES)


def _long_then_short(client: httpx.Client) -> tuple[dict, list[httpx.Response], float, list[float]]:
    """A streaming LONG-token request; once its first token is out, SHORT-token requests for each adapter.
    Returns the long answer's text, the short responses, and when the long and each short one finished."""
    started = threading.Event()
    long_body = {"model": "alpha", "prompt": "pretty good", "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    done: dict = {}

    def long_request() -> None:
        texts = []
        with (
            httpx.Client(base_url=str(client.base_url), timeout=120) as other,
            other.stream("POST", "/v1/completions", json=long_body | {"stream": True}) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    texts.append(json.loads(line[6:])["choices"][0]["text"])
                    started.set()
        done["text"], done["at"] = "".join(texts), time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    assert started.wait(60), "the long request never started"

    def short(name: str) -> tuple[httpx.Response, float]:
        answer = complete(client, name, "the app is bad", SHORT)
        return answer, time.monotonic()

    with ThreadPoolExecutor(len(NAMES)) as pool:
        shorts = list(pool.map(short, NAMES))
    thread.join(120)
    return done, [a for a, _ in shorts], done["at"], [t for _, t in shorts]


def test_short_requests_join_a_running_batch_and_keep_their_answers(root: Path) -> None:
    with serving(root, max_adapters=8, max_batch_size=8, max_wait_ms=5) as (client, server):
        before = metrics(client)
        done, shorts, long_end, short_ends = _long_then_short(client)
        after = metrics(client)
    assert max(short_ends) < long_end, "the short requests waited for the long one"
    for name, answer in zip(NAMES, shorts, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == reference_generate(
            root / name, root / "alpha", "the app is bad", 6
        )
    assert done["text"] == reference_generate(root / "alpha", root / "alpha", "pretty good", LONG)
    tokens = after["ia3_tokens_generated_total"] - before.get("ia3_tokens_generated_total", 0)
    assert tokens == LONG + SHORT * len(NAMES)
    assert after["ia3_active_rows"] == 0


def test_without_joining_short_requests_wait_for_the_batch(root: Path) -> None:
    """The baseline the benchmark compares against: the same traffic with joining off."""
    with serving(root, max_adapters=8, max_batch_size=8, max_wait_ms=5) as (client, server):
        server.batcher.join = False
        _, shorts, long_end, short_ends = _long_then_short(client)
    assert all(a.status_code == 200 for a in shorts)
    assert min(short_ends) > long_end


def test_failing_batches_are_counted_and_make_health_degraded(root: Path) -> None:
    """The real model raises on a prompt holding one token (a fault in the model path); other prompts work."""
    with serving(root, max_adapters=8, max_batch_size=8, max_wait_ms=5) as (client, server):
        poison = server.mixed.tokenizer("question", add_special_tokens=False)["input_ids"][0]

        def fault(module: object, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and bool((ids == poison).any()):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

        hook = server.mixed.model.register_forward_pre_hook(fault, with_kwargs=True)
        try:
            assert client.get("/health").status_code == 200
            for k in range(3):
                answer = complete(client, NAMES[k], "question : great")
                assert answer.status_code == 500, answer.text
                assert "illegal memory access" in answer.json()["error"]["message"]
                assert client.get("/health").status_code == (503 if k == 2 else 200)
            seen = metrics(client)
            assert seen['ia3_batches_failed_total{kind="generate"}'] == 3
            health = client.get("/health").json()
            assert health["status"] == "degraded" and health["failed_batches_in_a_row"] == 3
            assert "illegal memory access" in health["last_error"]
            assert complete(client, "alpha", "pretty good").status_code == 200
            assert client.get("/health").json()["status"] == "ok"
        finally:
            hook.remove()
