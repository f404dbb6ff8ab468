"""Continuous batching in `ia3 serve`: latency of short requests that arrive while long ones generate.

Base: a small random Llama (4 layers, hidden 256, SmolLM2's 49,152-token tokenizer and vocabulary), small enough
that the offered load stays below what a busy 2-core CPU serves (with SmolLM2-135M itself both modes only measure
an ever-growing queue). 4 adapters built as in bench/serve.py (real PEFT adapter files with random vectors). One
`ia3 serve` app (the real `Server` and `build_app`) under uvicorn on 127.0.0.1, torch on one thread
(BENCH_THREADS).

Traffic, per phase: BACKGROUND closed-loop clients each send 128-token requests (greedy, `ignore_eos`) back to back;
meanwhile 8-token requests arrive open-loop (seeded exponential gaps, mean GAP_S) for DURATION_S seconds, each for
a seeded adapter and prompt of the sentiment dev set. Measured: each 8-token request's latency (send to full
response), p50 and p99, and the background's tokens/s.

Phases alternate `join` off (the old behaviour: a request that arrives during a batch waits for the batch's longest
row; `Batcher.join = False` is only this benchmark's baseline switch) and on (it joins the running batch at its next
step), ROUNDS times each. Answers: every 8-token answer of both modes, and two 128-token ones, are compared with
PEFT's greedy tokens (`PeftModel` + `set_adapter` + `generate`) for the same adapter and prompt.
Target: p50 and p99 of the 8-token requests lower with joining, answers unchanged.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

from _common import QUICK, SENTIMENT, WORK, verdict, write_result
from serve import SMOLLM, build_adapters

N_ADAPTERS = 4
BACKGROUND = 2
LONG, SHORT = 128, 8
DURATION_S = 10 if QUICK else 30
GAP_S = 0.5
ROUNDS = 1 if QUICK else 2
MAX_BATCH = 8
MODEL_DIR = WORK / "llama-small-smollm-vocab"


def small_model():  # noqa: ANN201
    """The small random Llama with SmolLM2's tokenizer, saved once under bench/_work."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ia3cli.config.recipe import ModelSection
    from ia3cli.models.loading import load_tokenizer

    if (MODEL_DIR / "config.json").is_file():
        return MODEL_DIR
    tok = load_tokenizer(ModelSection(name=SMOLLM["name"], gguf_file=SMOLLM["gguf_file"], task="causal-lm"))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(MODEL_DIR)
    tok.save_pretrained(MODEL_DIR)
    return MODEL_DIR


def prompts() -> list[str]:
    rows = [json.loads(line) for line in (SENTIMENT / "dev.jsonl").read_text().splitlines() if line.strip()]
    return [f"Review: {r['text']}\nSentiment:" for r in rows[:16]]


def start_server(adapters):  # noqa: ANN001, ANN201
    import uvicorn

    from ia3cli.serving import app as serving

    mixed, root, loaded = serving.load(adapters, device="cpu")
    server = serving.Server(mixed, root, loaded=loaded, max_adapters=16, max_batch_size=MAX_BATCH, max_wait_ms=10)
    sock = serving.bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(serving.build_app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    return server, uv, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def phase(url: str, texts: list[str], seed: int) -> dict:
    """One phase of traffic; returns the short requests' latencies and answers, and the background's tokens/s."""
    import httpx

    rng = random.Random(seed)
    names = [f"a{k:04d}" for k in range(N_ADAPTERS)]
    stop = time.monotonic() + DURATION_S
    long_tokens, long_answers, short = [0], [], []

    async def post(client: httpx.AsyncClient, model: str, prompt: str, n: int) -> str:
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        answer = await client.post("/v1/completions", json=body)
        answer.raise_for_status()
        return answer.json()["choices"][0]["text"]

    async def background(client: httpx.AsyncClient, k: int) -> None:
        local = random.Random(seed * 100 + k)
        while time.monotonic() < stop:
            model, prompt = local.choice(names), local.choice(texts)
            long_answers.append((model, prompt, await post(client, model, prompt, LONG)))
            long_tokens[0] += LONG

    async def one_short(client: httpx.AsyncClient, model: str, prompt: str) -> None:
        t0 = time.perf_counter()
        text = await post(client, model, prompt, SHORT)
        short.append({"model": model, "prompt": prompt, "text": text, "latency_s": time.perf_counter() - t0})

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        workers = [asyncio.create_task(background(client, k)) for k in range(BACKGROUND)]
        await asyncio.sleep(2.0)  # the background batch is running before the first short request
        shorts = []
        while time.monotonic() < stop:
            shorts.append(asyncio.create_task(one_short(client, rng.choice(names), rng.choice(texts))))
            await asyncio.sleep(rng.expovariate(1 / GAP_S))
        await asyncio.gather(*shorts)
        await asyncio.gather(*workers)
        wall = time.perf_counter() - t0
    return {"short": short, "long": long_answers, "background_tokens_per_s": long_tokens[0] / wall}


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def peft_answers(adapters, wanted: set[tuple[str, str, int]]) -> dict:  # noqa: ANN001
    """PEFT's greedy text for each (adapter, prompt, tokens): one PeftModel, ``set_adapter`` per adapter. EOS is
    just another token, as with ``ignore_eos`` (``min_new_tokens`` would forbid it instead)."""
    import copy

    import torch

    from ia3cli.config.load import load_recipe
    from ia3cli.tuners import ia3

    first = adapters / "a0000"
    model, tok = ia3.load_run_model(first, load_recipe(first / "recipe.yaml"))
    model.eval()
    greedy = copy.deepcopy(model.generation_config)
    greedy.update(eos_token_id=None, do_sample=False, pad_token_id=0)
    out = {}
    for name, prompt, n in sorted(wanted):
        adapter = "default" if name == "a0000" else name
        if adapter not in model.peft_config:
            model.load_adapter(str(adapters / name), adapter_name=adapter)
        model.set_adapter(adapter)
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**ids, generation_config=greedy, max_new_tokens=n)
        assert gen.shape[1] == ids["input_ids"].shape[1] + n
        out[(name, prompt, n)] = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def main() -> None:
    model = {"name": str(small_model()), "task": "causal-lm"}
    adapters = build_adapters(N_ADAPTERS, model, WORK / "latency-adapters")
    texts = prompts()
    server, uv, thread, url = start_server(adapters)
    runs = []
    try:
        for r in range(ROUNDS):
            for join in (False, True):
                server.batcher.join = join
                result = asyncio.run(phase(url, texts, seed=r))
                runs.append({"join": join, "round": r, **result})
                lat = [s["latency_s"] for s in result["short"]]
                shown = f"p50 {quantile(lat, 0.5):.2f} s, p99 {quantile(lat, 0.99):.2f} s"
                print(f"join={join} round {r}: {len(lat)} short requests, {shown}, "
                      f"background {result['background_tokens_per_s']:.1f} tok/s")  # fmt: skip
    finally:
        uv.should_exit = True
        thread.join(30)

    wanted = {(s["model"], s["prompt"], SHORT) for run in runs for s in run["short"]}
    longs = [(m, p, LONG) for run in runs if run["join"] for m, p, _ in run["long"][:1]]
    reference = peft_answers(adapters, wanted | set(longs))
    mismatches = [
        {"join": run["join"], "model": s["model"], "prompt": s["prompt"], "got": s["text"], "peft": ref}
        for run in runs
        for s in run["short"]
        if s["text"] != (ref := reference[(s["model"], s["prompt"], SHORT)])
    ]
    mismatches += [
        {"join": True, "model": m, "prompt": p, "tokens": LONG, "got": text, "peft": reference[(m, p, LONG)]}
        for run in runs
        if run["join"]
        for m, p, text in run["long"][:1]
        if text != reference[(m, p, LONG)]
    ]
    summary = {}
    for join in (False, True):
        lat = [s["latency_s"] for run in runs if run["join"] == join for s in run["short"]]
        tps = [run["background_tokens_per_s"] for run in runs if run["join"] == join]
        summary["join" if join else "no_join"] = {
            "requests": len(lat),
            "p50_s": quantile(lat, 0.5),
            "p99_s": quantile(lat, 0.99),
            "mean_s": sum(lat) / len(lat),
            "background_tokens_per_s": sum(tps) / len(tps),
        }
    before, after = summary["no_join"], summary["join"]
    checked = sum(len(run["short"]) for run in runs) + len(longs)
    rows = [
        ["serve_latency", "8-token p50 before -> after (s)", f"{before['p50_s']:.2f} -> {after['p50_s']:.2f}",
         "lower", verdict(after["p50_s"] < before["p50_s"])],
        ["serve_latency", "8-token p99 before -> after (s)", f"{before['p99_s']:.2f} -> {after['p99_s']:.2f}",
         "lower", verdict(after["p99_s"] < before["p99_s"])],
        ["serve_latency", "answers equal to PEFT greedy", f"{checked - len(mismatches)}/{checked}", "all",
         verdict(not mismatches)],
    ]  # fmt: skip
    write_result(
        "serve_latency",
        {
            "what": "p50/p99 latency of 8-token requests behind 128-token requests, joining the running batch "
            "(continuous batching) vs waiting for it",
            "target": "lower p50 and p99 with joining; every answer equal to PEFT's greedy tokens",
            "settings": {
                "model": "random Llama: 4 layers, hidden 256, SmolLM2's tokenizer (49,152 tokens), float32",
                "adapters": N_ADAPTERS,
                "background_clients": BACKGROUND,
                "long_tokens": LONG,
                "short_tokens": SHORT,
                "duration_s": DURATION_S,
                "mean_gap_s": GAP_S,
                "rounds": ROUNDS,
                "max_batch_size": MAX_BATCH,
            },
            "summary": summary,
            "p50_speedup": before["p50_s"] / after["p50_s"],
            "p99_speedup": before["p99_s"] / after["p99_s"],
            "answers_checked": checked,
            "mismatches": mismatches,
            "runs": [{k: v for k, v in run.items() if k != "long"} for run in runs],
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
