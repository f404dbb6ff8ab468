"""`ia3 serve` end to end: a real uvicorn server on a free loopback port, called over HTTP with httpx.

Adapters are run dirs of tiny random models (tests/test_merge.py `make_run`), each rewritten with its own random
IA3 vectors (and head), so adapters really differ. Reference outputs come from plain PEFT (`PeftModel` with that
one adapter, `generate` / forward), never from the server's own code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from safetensors.torch import load_file, save_file

from ia3cli.config.load import load_recipe
from ia3cli.scoring.evaluation import score_choices
from ia3cli.serving import app as serve
from ia3cli.tuners import ia3
from tests.test_merge import make_run

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["alpha", "beta", "gamma"]
PROMPTS = ["a warm , clever comedy", "the app is bad", "pretty good", "review : great"]


def make_adapters(tmp: Path, model_dir: Path, task: str, names: list[str], quantization: str = "none") -> Path:
    """An adapter directory: one run dir per name, each with its own random vectors (U(0.5, 1.5)) and head."""
    template = make_run(tmp / "template", model_dir, task, quantization=quantization)
    root = tmp / "adapters"
    root.mkdir()
    for k, name in enumerate(names):
        dest = root / name
        shutil.copytree(template, dest)
        tensors = load_file(str(dest / "adapter_model.safetensors"))
        gen = torch.Generator().manual_seed(100 + k)
        for key, t in tensors.items():
            noise = torch.rand(t.shape, generator=gen)
            tensors[key] = noise + 0.5 if "ia3_l" in key else t + (noise - 0.5)
        save_file(tensors, str(dest / "adapter_model.safetensors"))
    return root


@contextlib.contextmanager
def serving(root: Path, **kwargs: object) -> Iterator[tuple[httpx.Client, serve.Server]]:
    """The real app under uvicorn in a thread, on a free 127.0.0.1 port; yields a client and the server state."""
    mixed, adapter_dir, loaded = serve.load(root)
    server = serve.Server(mixed, adapter_dir, loaded=loaded, **kwargs)
    sock = serve.bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(serve.build_app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60) as client:
            yield client, server
    finally:
        uv.should_exit = True
        thread.join(15)


def metrics(client: httpx.Client) -> dict[str, float]:
    """``/metrics`` parsed: ``{'name{labels}': value}`` (exposition lines without comments)."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def reference_generate(run_dir: Path | None, base_run: Path, prompt: str, n: int) -> str:
    """Greedy `n` tokens from plain PEFT with only this adapter (``None``: the base with the adapter disabled)."""
    recipe = load_recipe(base_run / "recipe.yaml")
    model, tok = ia3.load_run_model(run_dir or base_run, recipe)
    model.eval()
    ids = tok(prompt, return_tensors="pt")
    ctx = model.disable_adapter() if run_dir is None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def causal_root(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapters(tmp_path_factory.mktemp("causal"), tiny_model("llama", "causal-lm"), "causal-lm", NAMES)


@pytest.fixture(scope="module")
def causal(causal_root: Path) -> Iterator[tuple[httpx.Client, serve.Server]]:
    # max_batch_size 4 and a generous max wait: the 4 concurrent requests below always share one batch
    with serving(causal_root, max_adapters=8, max_batch_size=4, max_wait_ms=300) as pair:
        yield pair


def complete(client: httpx.Client, model: str, prompt: str, n: int = 6, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}
    return client.post("/v1/completions", json=body)


def test_mixed_batch_outputs_equal_each_adapter_alone(causal, causal_root: Path) -> None:
    client, server = causal
    base = server.mixed.base_name
    jobs = list(zip([*NAMES, base], PROMPTS, strict=True))
    before = metrics(client)
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: complete(client, *job), jobs))
    after = metrics(client)
    mixed_batches = (after["ia3_batch_adapters_count"] - before.get("ia3_batch_adapters_count", 0)) - (
        after['ia3_batch_adapters_bucket{le="1"}'] - before.get('ia3_batch_adapters_bucket{le="1"}', 0)
    )
    assert mixed_batches >= 1, "the concurrent requests never shared a batch"
    texts = []
    for (model, prompt), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 6
        run_dir = None if model == base else causal_root / model
        assert body["choices"][0]["text"] == reference_generate(run_dir, causal_root / "alpha", prompt, 6), model
        texts.append(body["choices"][0]["text"])
    # the adapters differ, so the same prompt through two adapters must differ too (or the test proves nothing)
    same = [complete(client, name, PROMPTS[0]).json()["choices"][0]["text"] for name in NAMES]
    assert len(set(same)) == len(NAMES), same


def read_events(response: httpx.Response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streaming_sends_the_same_text_token_by_token(causal, chat: bool) -> None:
    client, _ = causal
    if chat:
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "is it good ?"}]}
    else:
        url, body = "/v1/completions", {"prompt": "pretty good"}
    body |= {"model": "beta", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    whole = client.post(url, json=body).json()
    with client.stream("POST", url, json=body | {"stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == 6  # one per token, then the finish
    assert all(c["id"] == chunks[0]["id"] for c in chunks)
    if chat:
        assert chunks[0]["object"] == "chat.completion.chunk"
        text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
        assert text == whole["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]


def test_stop_string_and_seeded_sampling(causal) -> None:
    client, _ = causal
    full = complete(client, "gamma", "pretty good", 8).json()["choices"][0]["text"]
    words = full.split()
    stopped = complete(client, "gamma", "pretty good", 8, stop=[" " + words[2]]).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == " ".join(words[:2])
    sampled = [complete(client, "gamma", "pretty good", 8, temperature=1.0, seed=7).json() for _ in range(2)]
    assert sampled[0]["choices"][0]["text"] == sampled[1]["choices"][0]["text"]


def test_classify_choice_adapters_match_rank_classification(causal, causal_root: Path) -> None:
    client, _ = causal
    texts = ["A warm, clever comedy.", "The app is bad."]
    answer = client.post("/v1/classify", json={"model": "beta", "input": texts})
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    recipe = load_recipe(causal_root / "beta" / "recipe.yaml")
    model, tok = ia3.load_run_model(causal_root / "beta", recipe)
    with torch.no_grad():
        scores = score_choices(model.eval(), tok, recipe, [{"text": t} for t in texts])
    for row, score in zip(data, scores, strict=True):
        expected = torch.softmax(torch.tensor(score), -1).tolist()
        assert list(row["probabilities"]) == ["negative", "positive"]
        assert list(row["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
        assert row["label"] == ["negative", "positive"][int(torch.tensor(expected).argmax())]


def test_seq_cls_adapters_classify_with_their_own_heads(tiny_model, tmp_path: Path) -> None:
    root = make_adapters(tmp_path, tiny_model("llama", "seq-cls"), "seq-cls", ["alpha", "beta"])
    texts = ["pretty good", "the app is bad"]
    with serving(root, max_batch_size=4, max_wait_ms=300) as (client, _):
        with ThreadPoolExecutor(2) as pool:
            answers = list(
                pool.map(lambda n: client.post("/v1/classify", json={"model": n, "input": texts}), ["alpha", "beta"])
            )
        completion = complete(client, "alpha", "hi")
    assert completion.status_code == 400 and "classify" in completion.json()["error"]["message"]
    got = {}
    for name, answer in zip(["alpha", "beta"], answers, strict=True):
        assert answer.status_code == 200, answer.text
        recipe = load_recipe(root / name / "recipe.yaml")
        model, tok = ia3.load_run_model(root / name, recipe)
        with torch.no_grad():
            logits = model.eval()(**tok(texts, return_tensors="pt", padding=True)).logits
        expected = torch.softmax(logits, -1).tolist()
        got[name] = [list(row["probabilities"].values()) for row in answer.json()["data"]]
        for row, exp in zip(got[name], expected, strict=True):
            assert row == pytest.approx(exp, abs=1e-5)
    gap = max(abs(a - b) for ra, rb in zip(got["alpha"], got["beta"], strict=True) for a, b in zip(ra, rb, strict=True))
    assert gap > 1e-4  # each row used its own adapter and head


LONG = "good " * 300
ERRORS = [
    pytest.param("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found", id="unknown-adapter"),
    pytest.param("/v1/completions", {"model": "../alpha", "prompt": "x"}, 404, "model_not_found", id="dotdot-name"),
    pytest.param("/v1/classify", {"model": "nope", "input": "x"}, 404, "model_not_found", id="classify-unknown"),
    pytest.param("/v1/completions", {"model": "alpha"}, 422, "invalid_body", id="no-prompt"),
    pytest.param("/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 0}, 422, None, id="max-tokens-0"),
    pytest.param("/v1/completions", {"model": "alpha", "prompt": "x", "temperature": 9}, 422, None, id="temperature"),
    pytest.param("/v1/chat/completions", {"model": "alpha", "messages": []}, 422, None, id="no-messages"),
    pytest.param("/v1/completions", "{not json", 422, None, id="not-json"),
    pytest.param("/v1/completions", {"model": "alpha", "prompt": ["x"] * 257}, 422, None, id="too-many-prompts"),
    pytest.param("/v1/completions", {"model": "alpha", "prompt": LONG}, 413, "context_length_exceeded", id="long"),
    pytest.param("/v1/classify", {"model": "alpha", "input": [LONG]}, 413, "context_length_exceeded", id="long-in"),
    pytest.param("/v1/classify", {"model": "alpha", "input": [{"title": "x"}]}, 422, None, id="missing-column"),
]


@pytest.mark.parametrize(("url", "body", "status", "code"), ERRORS)
def test_bad_requests_get_openai_shaped_errors(causal, url: str, body: object, status: int, code: str | None) -> None:
    client, _ = causal
    if isinstance(body, str):
        answer = client.post(url, content=body, headers={"content-type": "application/json"})
    else:
        answer = client.post(url, json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"]
    if code:
        assert error["code"] == code


def test_api_key_is_required_everywhere_but_health(causal) -> None:
    client, server = causal
    server.api_key = "s3cret"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for method, url in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
                answer = client.request(method, url, headers=headers, json={"model": "alpha", "prompt": "x"})
                assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        server.api_key = None


def test_paths_outside_the_adapter_dir_are_refused(causal, causal_root: Path) -> None:
    client, _ = causal
    outside = causal_root.parent / "template" / "run"  # a valid run dir, but outside the adapter directory
    link = causal_root / "link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        for path in ["../template/run", str(outside), "link", "alpha/../../template/run", "/etc", "alpha\x00"]:
            answer = client.post("/adapters", json={"name": "sneaky", "path": path})
            assert answer.status_code == 403, (path, answer.text)
            assert answer.json()["error"]["code"] == "path_outside_adapter_dir"
        assert complete(client, "link", "x").status_code == 404  # a symlinked folder out is not an adapter either
        assert complete(client, "sneaky", "x").status_code == 404
        assert "link" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    finally:
        link.unlink()


def test_adapters_hot_load_register_and_unload(causal) -> None:
    client, _ = causal
    loads = metrics(client)["ia3_adapter_loads_total"]
    beta = complete(client, "beta", "pretty good").json()["choices"][0]["text"]
    added = client.post("/adapters", json={"name": "beta-copy", "path": "beta"})
    assert added.status_code == 201 and added.json()["bytes"] > 0
    assert complete(client, "beta-copy", "pretty good").json()["choices"][0]["text"] == beta
    listed = {m["id"]: m["loaded"] for m in client.get("/v1/models").json()["data"]}
    assert listed["beta-copy"] is True
    assert client.delete("/adapters/beta-copy").status_code == 200
    assert complete(client, "beta-copy", "pretty good").status_code == 404  # registered names go with DELETE
    assert client.delete("/adapters/gamma").status_code in (200, 404)
    assert {m["id"]: m["loaded"] for m in client.get("/v1/models").json()["data"]}["gamma"] is False
    assert complete(client, "gamma", "pretty good").status_code == 200  # a folder name hot-loads again
    assert metrics(client)["ia3_adapter_loads_total"] > loads
    assert client.delete("/adapters/nope").status_code == 404
    assert client.post("/adapters", json={"name": "x", "path": "missing"}).status_code == 404


def test_an_adapter_of_another_base_is_refused_when_it_loads(
    causal, causal_root: Path, tiny_model, tmp_path: Path
) -> None:
    client, _ = causal
    other = causal_root / "other-base"
    shutil.copytree(make_run(tmp_path, tiny_model("bert", "seq-cls"), "seq-cls"), other)
    try:
        answer = complete(client, "other-base", "pretty good")
        assert answer.status_code == 400, answer.text
        assert "other-base" in answer.json()["error"]["message"]
        assert complete(client, "alpha", "pretty good").status_code == 200
    finally:
        shutil.rmtree(other)


def test_lru_evicts_beyond_max_adapters_and_reloads_on_use(causal_root: Path) -> None:
    with serving(causal_root, max_adapters=2, max_wait_ms=1) as (client, _):
        first = complete(client, "alpha", "pretty good").json()["choices"][0]["text"]
        for name in ["beta", "gamma"]:
            assert complete(client, name, "pretty good").status_code == 200
        seen = metrics(client)
        assert seen["ia3_adapters_loaded"] == 2 and seen["ia3_adapter_evictions_total"] == 1
        loaded = {m["id"]: m["loaded"] for m in client.get("/v1/models").json()["data"]}
        assert [loaded[n] for n in NAMES] == [False, True, True]
        assert complete(client, "alpha", "pretty good").json()["choices"][0]["text"] == first
        seen = metrics(client)
        assert seen["ia3_adapter_evictions_total"] == 2 and seen["ia3_adapter_loads_total"] == 3


def test_a_client_that_disconnects_frees_its_row(causal) -> None:
    client, server = causal
    before = metrics(client)
    budget = server.context - 8
    body = {"model": "alpha", "prompt": "pretty good", "max_tokens": budget, "temperature": 0, "ignore_eos": True}
    with (
        httpx.Client(base_url=str(client.base_url), timeout=60) as other,
        other.stream("POST", "/v1/completions", json=body | {"stream": True}) as response,
    ):
        lines = response.iter_lines()
        got = [line for _, line in zip(range(4), lines, strict=False)]
        assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 30
    while True:
        seen = metrics(client)
        if seen["ia3_rows_cancelled_total"] > before.get("ia3_rows_cancelled_total", 0):
            break
        assert time.monotonic() < deadline, "the row kept generating after its client left"
        time.sleep(0.05)
    assert seen["ia3_active_rows"] == 0
    assert seen["ia3_tokens_generated_total"] - before["ia3_tokens_generated_total"] < budget
    assert complete(client, "beta", "pretty good").status_code == 200  # and the server goes on


def test_health_models_and_metrics(causal) -> None:
    client, server = causal
    assert client.get("/health").json()["status"] == "ok"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[0] == server.mixed.base_name and set(NAMES) <= set(ids)
    text = client.get("/metrics").text
    for name in ("ia3_requests_total", "ia3_batch_rows", "ia3_request_duration_seconds", "ia3_adapters_loaded"):
        assert f"# TYPE {name} " in text
    assert 'ia3_requests_total{code="200",endpoint="/health"}' in text


def test_cli_serves_on_loopback_with_the_key_from_the_environment(causal_root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IA3_API_KEY": "k3y", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ia3cli", "serve", str(causal_root), "--port", "0", "--max-adapters", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        lines: list[str] = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if " on http://" in line:
                url = line.rsplit(" on ", 1)[1].strip()
        assert url and url.startswith("http://127.0.0.1:"), "".join(lines)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/v1/models").status_code == 401
            models = client.get("/v1/models", headers={"Authorization": "Bearer k3y"}).json()["data"]
            assert {"alpha", "beta", "gamma"} <= {m["id"] for m in models}
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_refuses_a_folder_without_run_dirs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ia3cli.cli.app import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "no run dirs" in result.output
