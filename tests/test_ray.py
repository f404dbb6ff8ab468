"""`ia3 serve --ray` and `ia3 predict --ray` on a real local Ray cluster (2 CPUs, one for the whole test run).

Serving: 8 adapters of a tiny llama, 2 replicas behind Ray Serve's HTTP proxy on a loopback port, called with
httpx. Every answer is compared with the single-process server (`tests.test_serve.serving`) on the same adapter
directory, and with PEFT; adapter loads are read from the deployment's `/metrics` (one series per replica).
Predicting: 2,000 rows over 3 seq-cls adapters through Ray Data, compared row for row with `ia3 predict`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from ia3cli.cli.app import app
from ia3cli.inference.predict import predict, sidecar
from tests.conftest import free_port
from tests.test_mixed import make_adapter
from tests.test_predict import TEXTS
from tests.test_serve import ERRORS, complete, make_adapters, metrics, reference_generate, serving

NAMES = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
PROMPTS = ["pretty good", "the app is bad", "a warm , clever comedy", "review : great"]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapters(tmp_path_factory.mktemp("ray"), tiny_model("llama", "causal-lm"), "causal-lm", NAMES)


@pytest.fixture(scope="module")
def deployed(ray_cluster, adapters: Path) -> Iterator[httpx.Client]:
    """The deployment: router + 2 replicas, each keeping up to 8 adapters, on a free loopback port."""
    from ray import serve

    from ia3cli.serving import ray_deploy

    options = {"max_adapters": 8, "max_batch_size": 8, "max_wait_ms": 50.0}
    url = ray_deploy.deploy(
        adapters, server_options=options, replica_scaling={"num_replicas": 2}, port=free_port(), replica_cpus=0.5
    )
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def single(adapters: Path) -> Iterator[httpx.Client]:
    with serving(adapters, max_adapters=8, max_batch_size=8, max_wait_ms=50) as (client, _):
        yield client


def text(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["text"]


def loads(client: httpx.Client) -> dict[str, float]:
    """Adapter loads per replica, from the deployment's /metrics."""
    return {k: v for k, v in metrics(client).items() if k.startswith("ia3_adapter_loads_total{")}


def test_answers_equal_the_single_process_server_and_peft_with_affinity(deployed, single, adapters: Path) -> None:
    base = single.get("/health").json()["base"]
    for name in NAMES:  # first pass: each adapter once, so Ray learns which replica holds it
        assert text(complete(deployed, name, PROMPTS[0])) == text(complete(single, name, PROMPTS[0]))
    time.sleep(1.0)  # the replicas push their adapters to the routers every 0.1 s
    first = sum(loads(deployed).values())
    assert first <= len(NAMES)
    jobs = [(name, prompt) for prompt in PROMPTS for name in [*NAMES, base]]
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: text(complete(deployed, *job)), jobs))
    expected = [text(complete(single, *job)) for job in jobs]
    assert got == expected
    for name in NAMES[:3]:  # and PEFT, with each adapter alone
        answer = text(complete(deployed, name, PROMPTS[1]))
        assert answer == reference_generate(adapters / name, adapters / NAMES[0], PROMPTS[1], 6)
    per_replica = loads(deployed)
    assert len(per_replica) == 2, per_replica  # both replicas report
    # affinity: an adapter goes back to the replica that holds it (random routing loads each one on both)
    assert sum(per_replica.values()) <= len(NAMES) + 2, per_replica
    health = deployed.get("/health").json()
    assert health["status"] == "ok" and len(health["replicas"]) == 2 and health["base"] == base


def test_streams_pass_through_the_router(deployed) -> None:
    body = {"model": "beta", "prompt": "pretty good", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    whole = text(deployed.post("/v1/completions", json=body))
    with deployed.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert "".join(json.loads(line)["choices"][0]["text"] for line in lines[:-1]) == whole


@pytest.mark.parametrize(("url", "body", "status", "code"), ERRORS)
def test_bad_requests_get_the_same_errors_as_one_process(deployed, single, url, body, status, code) -> None:
    def send(client: httpx.Client) -> httpx.Response:
        if isinstance(body, str):
            return client.post(url, content=body, headers={"content-type": "application/json"})
        return client.post(url, json=body)

    ray_answer, one_answer = send(deployed), send(single)
    assert ray_answer.status_code == one_answer.status_code == status, ray_answer.text
    assert ray_answer.json()["error"]["code"] == one_answer.json()["error"]["code"]
    assert ray_answer.json()["error"]["type"] == "invalid_request_error"


def test_run_time_registration_is_refused_cleanly_on_ray(deployed) -> None:
    for answer in (deployed.post("/adapters", json={"name": "x", "path": "../x"}), deployed.delete("/adapters/beta")):
        assert answer.status_code == 501 and answer.json()["error"]["code"] == "not_supported_on_ray"
    assert complete(deployed, "beta", "pretty good").status_code == 200


def test_a_killed_replica_costs_at_most_503s_and_comes_back(deployed) -> None:
    from ray import serve

    victim = deployed.get("/health").json()["replicas"][0]["pid"]
    statuses: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic(k: int) -> None:
        with httpx.Client(base_url=str(deployed.base_url), timeout=60) as client:
            i = k
            while not stop.is_set():
                answer = complete(client, NAMES[i % len(NAMES)], PROMPTS[i % len(PROMPTS)])
                statuses.append((time.monotonic(), answer.status_code))
                i += 1

    threads = [threading.Thread(target=traffic, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join(90)
        assert not t.is_alive(), "a request hung"
    codes = [code for _, code in statuses]
    print(f"answers during the kill: {codes.count(200)} x 200, {codes.count(503)} x 503")
    assert codes and set(codes) <= {200, 503}, sorted(set(codes))
    assert any(code == 200 for t, code in statuses if t > killed_at + 1)  # the other replica kept answering
    while True:  # back to 2 replicas, the new one serving
        replicas = deployed.get("/health").json().get("replicas", [])
        running = serve.status().applications["ia3"].deployments["ia3-replica"].replica_states.get("RUNNING", 0)
        if len(replicas) == 2 and victim not in [r["pid"] for r in replicas] and running == 2:
            break
        assert time.monotonic() - killed_at < 60, (replicas, running)
        time.sleep(1)
    assert all(complete(deployed, name, "pretty good").status_code == 200 for name in NAMES)


def test_cli_deploys_evicts_and_removes_the_app_on_sigterm(deployed, single, adapters, ray_cluster) -> None:
    """``ia3 serve --ray`` as a process: deploys, answers, evicts; SIGTERM (how Kubernetes stops a pod; Ctrl-C takes
    the same path) drains the replicas and deletes the app."""
    from ray import serve

    port = str(deployed.base_url).rsplit(":", 1)[1].strip("/")  # the cluster's HTTP proxy is already on this port
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "ia3cli", "serve", str(adapters), "--ray", "--ray-address", address]
    cmd += ["--replicas", "1", "--replica-cpus", "0.5", "--port", port, "--max-adapters", "4"]
    env = {**os.environ, "IA3_API_KEY": "k3y"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    keyed = httpx.Client(base_url=deployed.base_url, headers={"Authorization": "Bearer k3y"}, timeout=120)
    try:
        lines: list[str] = []
        while not any(" at http://" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        deadline = time.monotonic() + 60
        while len(deployed.get("/health").json().get("replicas", [])) != 1:  # the new deployment's one replica
            assert time.monotonic() < deadline
            time.sleep(0.5)
        for url in ("/v1/models", "/metrics"):  # the key is checked by the replicas' app and by the router
            assert deployed.get(url).status_code == 401 and keyed.get(url).status_code == 200
        for name in [*NAMES[:6], NAMES[0]]:  # 6 adapters through a replica keeping 4: Ray evicts, we unload
            assert text(complete(keyed, name, PROMPTS[2])) == text(complete(single, name, PROMPTS[2]))
        time.sleep(1.5)
        seen = metrics(keyed)
        loaded = [v for k, v in seen.items() if k.startswith("ia3_adapters_loaded{")]
        evicted = [v for k, v in seen.items() if k.startswith("ia3_adapter_evictions_total{")]
        assert loaded == [4] and evicted[0] >= 3, seen
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0  # replicas drain (5 s grace), then the app is deleted
        assert "stopping" in proc.stdout.read()
    finally:
        keyed.close()
        if proc.poll() is None:
            proc.kill()
    assert "ia3" not in serve.status().applications


# --- predict ----------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_on_ray_equals_ia3_predict_row_for_row(ray_cluster, tiny_model, tmp_path: Path) -> None:
    model_dir = tiny_model("bert", "seq-cls")
    for seed, name in enumerate(["a", "b", "c"], 1):
        make_adapter(tmp_path / "runs", model_dir, "seq-cls", name, seed)
    words = " ".join(TEXTS).split()
    rnd = random.Random(0)
    lines = []
    for i in range(2000):
        row = {"id": i, "text": " ".join(rnd.choices(words, k=rnd.randint(1, 12))), "adapter": rnd.choice("abc")}
        lines.append(json.dumps(row))
    lines[7], lines[1500] = "{not json", json.dumps({"id": -1, "text": "x", "adapter": "nope"})  # skipped
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(lines) + "\n")

    one = predict(tmp_path / "runs", src, tmp_path / "one.jsonl", on_error="skip", printer=lambda _: None)
    args = ["predict", str(tmp_path / "runs"), "-i", str(src), "-o", str(tmp_path / "ray.jsonl"), "--on-error", "skip"]
    result = CliRunner().invoke(app, [*args, "--ray", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "1998 predictions written" in result.output

    got, expected = read_jsonl(tmp_path / "ray.jsonl"), read_jsonl(one.output)
    assert len(got) == len(expected) == 1998
    for g, e in zip(got, expected, strict=True):
        same = ("id", "text", "adapter", "prediction")
        assert [g[k] for k in same] == [e[k] for k in same]
        assert list(g["probabilities"]) == list(e["probabilities"])
        assert list(g["probabilities"].values()) == pytest.approx(list(e["probabilities"].values()), abs=1e-5)
    ray_meta = json.loads(sidecar(tmp_path / "ray.jsonl").read_text())
    one_meta = json.loads(sidecar(one.output).read_text())
    assert ray_meta == one_meta and [e["where"] for e in ray_meta["errors"]] == ["line 8", "line 1501"]


def test_ray_data_reads_every_format_as_ia3_predict_does(ray_cluster, tmp_path: Path) -> None:
    import csv
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ia3cli.inference import ray_predict
    from ia3cli.inference.rows import read_rows

    with (tmp_path / "rows.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["text", "n"], ["good", "1"], ["multi\nline", "2"], ["short"], ["fine", "4"]])
    pq.write_table(pa.table({"text": TEXTS, "n": list(range(5))}), tmp_path / "rows.parquet")
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n\n{oops\n[1]\n{"text": "b", "n": 2.5}\n')
    (tmp_path / "rows.json").write_text(json.dumps([{"text": "a"}, "x", {"text": "b"}]))
    for name in ("rows.csv", "rows.parquet", "rows.jsonl", "rows.json"):
        dataset = ray_cluster.data.read_datasource(ray_predict.datasource(tmp_path / name), num_cpus=0)
        rows = [(r["where"], r["row"] and pickle.loads(r["row"]), r["problem"]) for r in dataset.iter_rows()]
        assert rows == read_rows(tmp_path / name), name


def test_predict_on_ray_refuses_bad_rows_before_any_work(ray_cluster, tiny_model, tmp_path: Path) -> None:
    make_adapter(tmp_path / "runs", tiny_model("bert", "seq-cls"), "seq-cls", "a", 1)
    src = tmp_path / "rows.jsonl"
    src.write_text('{"text": "good"}\n[1, 2]\n{"title": "no text"}\n')
    out = tmp_path / "out.jsonl"
    results = [
        CliRunner().invoke(app, ["predict", str(tmp_path / "runs"), "-i", str(src), "-o", str(out), *extra])
        for extra in ([], ["--ray"])
    ]
    assert [r.exit_code for r in results] == [2, 2]
    assert results[0].output == results[1].output and "line 2" in results[0].output and "line 3" in results[0].output
    assert not out.exists() and not sidecar(out).exists()


@pytest.mark.parametrize("command", ["serve", "predict"])
def test_ray_options_without_ray_installed_are_an_exit_2(command: str, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as without the extra
    args = [command, str(tmp_path), *(["-i", str(tmp_path / "x.jsonl")] if command == "predict" else []), "--ray"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "pip install 'ia3cli[ray]'" in result.output
    without = CliRunner().invoke(app, [*args[:-1], "--ray-address", "auto"])
    assert without.exit_code == 2 and "--ray-address needs --ray" in without.output


@pytest.mark.parametrize(
    ("replicas", "low", "high", "expected"),
    [
        (None, None, None, {"num_replicas": 1}),
        (3, None, None, {"num_replicas": 3}),
        (None, 1, 4, {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}}),
        (None, None, 2, {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32}}),
        (0, None, None, "--replicas 0"),
        (2, 1, 4, "--replicas is a fixed count"),
        (None, 3, 2, "min <= max"),
    ],
)
def test_replica_count_or_autoscaling_bounds(replicas, low, high, expected) -> None:
    from ia3cli.errors import Ia3Error
    from ia3cli.serving.ray_deploy import scaling

    if isinstance(expected, dict):
        assert scaling(replicas, low, high, 32) == expected
    else:
        with pytest.raises(Ia3Error, match=expected):
            scaling(replicas, low, high, 32)
