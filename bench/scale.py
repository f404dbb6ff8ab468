"""Scaling out on Ray: `ia3 serve --ray` replicas and `ia3 predict --ray` workers against one process.

One local Ray cluster (`ray.init(num_cpus=2)`, this machine's 2 cores), tiny random models (the tests' llama and
bert: hidden 64, 2 layers) so the figures show what Ray adds and saves, not a model's FLOPs. Three measurements:

1. Serving requests/s: `ia3 serve` in one process (a subprocess) against the Ray deployment with 1 and with 2
   replicas (1 CPU each). Closed loop: CLIENTS concurrent httpx clients, /v1/completions, greedy, MAX_TOKENS
   tokens, request i on adapter i mod 16, REQUESTS requests after one untimed request per adapter.
2. Adapter loads at 256 adapters: 2 replicas with room for all 256 each, every adapter requested twice in a seeded
   shuffled order by 16 concurrent clients. Multiplexed routing (the router sets each request's model as Ray's
   multiplexed model id) against Ray's default routing (the same requests through the replica deployment's handle
   without a model id: power of two choices on queue length, which load-balances like round robin). Loads are
   `ia3_adapter_loads_total` summed over the replicas; the ideal is 255 (a0000 loads with the base), random
   routing about 384. A few extra loads are expected: a replica tells the routers what it is loading every 0.1 s,
   so the second request for an adapter can arrive before they know and go to the replica with fewer adapters.
3. Predict rows/s: `ia3 predict` (one process) against `ia3 predict --ray --workers 1` and `--workers 2`, each a
   subprocess joining the cluster, on 10 x ROWS rows over 3 seq-cls adapters, wall time including start-up
   (imports, model loads, actor start). The peak RSS of the command's own process (``VmHWM``: for `--ray` the
   driver, the actors are other processes) at ROWS and at 100 x ROWS rows: on Ray it should not grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import QUICK, ROOT, WORK, write_result

CLIENTS = 16
REQUESTS = 64 if QUICK else 256
MAX_TOKENS = 8
SERVE_ADAPTERS = 16
MANY = 32 if QUICK else 256
ROWS = 500 if QUICK else 2000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(work: Path) -> tuple[Path, Path]:
    """The adapter folders (built once): MANY causal-lm adapters of a tiny llama, 3 seq-cls ones of a tiny bert."""
    from tests.conftest import save_tiny
    from tests.test_mixed import make_adapter
    from tests.test_serve import make_adapters

    causal, cls = work / "causal" / "adapters", work / "cls" / "runs"
    if not (causal / f"a{MANY - 1:04d}").is_dir():  # (again when a --quick run built fewer)
        shutil.rmtree(work / "causal", ignore_errors=True)
        model = save_tiny("llama", "causal-lm", work / "llama")
        make_adapters(work / "causal", model, "causal-lm", [f"a{i:04d}" for i in range(MANY)])
    if not cls.is_dir():
        model = save_tiny("bert", "seq-cls", work / "bert")
        for seed, name in enumerate(["a", "b", "c"], 1):
            make_adapter(cls, model, "seq-cls", name, seed)
    return causal, cls


def traffic(url: str, names: list[str], total: int, tokens: int = MAX_TOKENS) -> dict[str, float]:
    """``total`` requests by CLIENTS closed-loop clients; requests/s and latency percentiles."""
    import httpx

    async def main() -> dict[str, float]:
        latencies: list[float] = []
        codes: list[int] = []
        queue = list(range(total))
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:

            async def one_client() -> None:
                while queue:
                    i = queue.pop()
                    body = {"model": names[i % len(names)], "prompt": "pretty good", "max_tokens": tokens}
                    t0 = time.perf_counter()
                    answer = await client.post("/v1/completions", json=body | {"temperature": 0, "ignore_eos": True})
                    latencies.append(time.perf_counter() - t0)
                    codes.append(answer.status_code)

            t0 = time.perf_counter()
            await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
            wall = time.perf_counter() - t0
        latencies.sort()
        ok = codes.count(200)
        assert ok == total, f"{total - ok} of {total} requests failed: {sorted(set(codes))}"
        return {"req_s": ok / wall, "ok": ok, "p50_s": latencies[len(latencies) // 2], "p99_s": latencies[-1]}

    return asyncio.run(main())


def warm(url: str, names: list[str]) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=300) as client:
        for name in names:
            client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1})


def one_process_serving(adapters: Path, names: list[str]) -> dict[str, float]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "ia3cli", "serve", str(adapters), "--port", str(port), "--max-batch-size", "32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "ia3 serve did not start"
            time.sleep(0.5)
        warm(url, names)
        return traffic(url, names, REQUESTS)
    finally:
        proc.terminate()
        proc.wait(30)


def deploy(adapters: Path, replicas: int, max_adapters: int) -> str:
    from ia3cli.serving import ray_deploy

    options = {"max_adapters": max_adapters, "max_batch_size": 32, "max_wait_ms": 10.0}
    return ray_deploy.deploy(adapters, server_options=options, replica_scaling={"num_replicas": replicas}, port=PORT)


def loads(url: str) -> float:
    import httpx

    time.sleep(2)  # each replica reports its metrics twice a second
    text = httpx.get(url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ia3_adapter_loads_total")
    )


def default_routing(names: list[str]) -> None:
    """The same requests through the replica deployment's handle, with no multiplexed model id."""
    from ray import serve

    handle = serve.get_deployment_handle("ia3-replica", app_name="ia3").options(stream=True)
    headers = [(b"content-type", b"application/json")]
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "path": "/v1/completions"}
    scope |= {"raw_path": b"/v1/completions", "query_string": b"", "headers": headers}

    def one(name: str) -> None:
        body = json.dumps({"model": name, "prompt": "hi", "max_tokens": 1}).encode()
        for _ in handle.forward.remote(scope, body):
            pass

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, names))


def serving(ray: object, adapters: Path) -> dict[str, object]:
    from ray import serve

    names = [f"a{i:04d}" for i in range(SERVE_ADAPTERS)]
    out: dict[str, object] = {"one_process": one_process_serving(adapters, names)}
    for replicas in (1, 2):
        url = deploy(adapters, replicas, 64)
        warm(url, names)
        out[f"ray_{replicas}_replicas"] = traffic(url, names, REQUESTS)
        serve.delete("ia3")
    many = [f"a{i:04d}" for i in range(MANY)] * 2
    random.Random(0).shuffle(many)
    url = deploy(adapters, 2, MANY + 1)
    out["multiplexed"] = traffic(url, many, len(many), tokens=1) | {"loads": loads(url)}
    serve.delete("ia3")
    url = deploy(adapters, 2, MANY + 1)
    t0 = time.perf_counter()
    default_routing(many)
    out["default_routing"] = {"req_s": len(many) / (time.perf_counter() - t0), "loads": loads(url)}
    serve.shutdown()
    return out


def write_rows(path: Path, n: int) -> Path:
    rnd = random.Random(0)
    words = " ".join(["a warm clever comedy", "ads and upsells sadly", "pretty good", "not worth the money"]).split()
    with path.open("w") as fh:
        for i in range(n):
            row = {"id": i, "text": " ".join(rnd.choices(words, k=rnd.randint(2, 12))), "adapter": rnd.choice("abc")}
            fh.write(json.dumps(row) + "\n")
    return path


def predict_run(runs: Path, rows: Path, out: Path, extra: list[str]) -> dict[str, float]:
    """One `ia3 predict` subprocess: wall time and its peak RSS in MiB (``VmHWM``, read as it runs)."""
    for path in (out, out.with_name(out.name + ".predict.json")):
        path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ia3cli", "predict", str(runs), "-i", str(rows), "-o", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    log = out.with_suffix(".log")
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    peak_kib = 0
    while proc.poll() is None:  # wait4's ru_maxrss would count this process's size at fork
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{proc.pid}/status").read_text()
            if "VmHWM:" in status:  # not once it has exited
                peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, log.read_text()[-2000:]
    return {"wall_s": wall, "peak_rss_mib": peak_kib / 1024}


def gap(one: Path, other: Path) -> float:
    """The largest probability difference between two predict outputs (which must agree row for row otherwise)."""
    a = [json.loads(line) for line in one.read_text().splitlines()]
    b = [json.loads(line) for line in other.read_text().splitlines()]
    pairs = list(zip(a, b, strict=True))
    assert all(x["id"] == y["id"] and x["prediction"] == y["prediction"] for x, y in pairs)
    return max(abs(x["probabilities"][k] - y["probabilities"][k]) for x, y in pairs for k in x["probabilities"])


def predicting(ray: object, runs: Path, work: Path) -> dict[str, object]:
    address = ray.get_runtime_context().gcs_address
    on_ray = ["--ray", "--ray-address", address, "--workers"]
    sizes = {"small": ROWS, "rate": 10 * ROWS, "huge": 100 * ROWS}
    files = {name: write_rows(work / f"rows-{n}.jsonl", n) for name, n in sizes.items()}
    out: dict[str, object] = {"rows": sizes}
    for size in ("rate", "small", "huge"):  # rows/s at 10 x ROWS; the driver's memory at ROWS and 100 x ROWS
        out[f"one_process_{size}"] = predict_run(runs, files[size], work / f"one-{size}.jsonl", [])
        for workers in (1, 2) if size == "rate" else (2,):
            output = work / f"ray{workers}-{size}.jsonl"
            out[f"ray_{workers}_workers_{size}"] = predict_run(runs, files[size], output, [*on_ray, str(workers)])
    for name, run in out.items():
        if name != "rows":
            run["rows_s"] = sizes[name.rsplit("_", 1)[1]] / run["wall_s"]
    out["max_probability_gap"] = gap(work / "one-rate.jsonl", work / "ray2-rate.jsonl")
    return out


PORT = free_port()


def main() -> None:
    import ray

    work = WORK / "scale"
    work.mkdir(parents=True, exist_ok=True)
    causal, cls = build(work)
    os.environ["PYTHONPATH"] = str(ROOT)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        done = work / "serve-results.json"  # --reuse-serve: keep the serving figures of an earlier run
        if "--reuse-serve" in sys.argv and done.is_file():
            serve_out = json.loads(done.read_text())
        else:
            serve_out = serving(ray, causal)
            done.write_text(json.dumps(serve_out, indent=2))
        done = work / "predict-results.json"  # --reuse-predict: likewise for predicting
        if "--reuse-predict" in sys.argv and done.is_file():
            predict_out = json.loads(done.read_text())
        else:
            predict_out = predicting(ray, cls, work)
            done.write_text(json.dumps(predict_out, indent=2))
    finally:
        ray.shutdown()
    s, p = serve_out, predict_out
    rows = [
        [
            "scale",
            "serve req/s: one process / Ray 1 replica / Ray 2 replicas",
            " / ".join(f"{s[k]['req_s']:.1f}" for k in ("one_process", "ray_1_replicas", "ray_2_replicas")),
            "",
            "",
        ],
        [
            "scale",
            f"adapter loads at {MANY} adapters x 2 requests: multiplexed / Ray default routing",
            f"{s['multiplexed']['loads']:.0f} / {s['default_routing']['loads']:.0f}",
            f"<= 1.05 x {MANY} (random: ~1.5 x)",
            "",
        ],
        [
            "scale",
            f"predict rows/s ({10 * ROWS} rows, start-up included): one process / Ray 1 worker / Ray 2 workers",
            " / ".join(
                f"{p[k]['rows_s']:.0f}" for k in ("one_process_rate", "ray_1_workers_rate", "ray_2_workers_rate")
            ),
            "",
            "",
        ],
        [
            "scale",
            f"predict peak RSS MiB of the driver, {ROWS} -> {100 * ROWS} rows: one process / Ray",
            f"{p['one_process_small']['peak_rss_mib']:.0f} -> {p['one_process_huge']['peak_rss_mib']:.0f} / "
            f"{p['ray_2_workers_small']['peak_rss_mib']:.0f} -> {p['ray_2_workers_huge']['peak_rss_mib']:.0f}",
            "Ray: flat (+10%)",
            "",
        ],
    ]
    ideal = s["multiplexed"]["loads"] <= 1.05 * MANY
    rows[1][4] = "met" if ideal else "MISSED"
    flat = p["ray_2_workers_huge"]["peak_rss_mib"] <= 1.1 * p["ray_2_workers_small"]["peak_rss_mib"]
    rows[3][4] = "met" if flat else "MISSED"
    settings = {"clients": CLIENTS, "requests": REQUESTS, "max_tokens": MAX_TOKENS, "serve_adapters": SERVE_ADAPTERS}
    settings |= {"many_adapters": MANY, "predict_rows": ROWS, "ray_cpus": 2, "replica_cpus": 1, "worker_cpus": 1}
    what = "Ray Serve replicas and Ray Data workers against one process, tiny models, on this machine's 2 cores"
    write_result("scale", {"what": what, "settings": settings, "serve": s, "predict": p, "rows": rows})


if __name__ == "__main__":
    main()
