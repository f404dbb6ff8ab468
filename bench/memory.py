"""Memory: peak process memory of loading and of training a ~100M-parameter Llama in float32, bfloat16 and 4-bit.

Measures, for each configuration in a fresh subprocess (so peaks do not carry over):

- weights: ``model.get_memory_footprint()`` right after loading (parameters and buffers only);
- peak after imports, after loading and after a few training steps: ``VmHWM`` from /proc/self/status (the
  process's peak resident set size), and the resident size after loading and after training (``VmRSS``, split
  into anonymous and file-backed pages);

The checkpoint on disk is float32, so bfloat16 and 4-bit loads read float32 tensors and convert them: their
load peak holds both copies for a while, which is why it can exceed the float32 load peak. A float32 load maps
the file without copying: its pages become resident (file-backed) only as training touches them, so its load peak
is low and its training peak includes them. At ~100M parameters, imports (~230 MiB) and activations dominate the
training peak; the weights-only ratio is the one that carries over to larger models.

Model: a random Llama (12 layers, hidden 768, 32k vocabulary, tied embeddings; ~102M parameters) built from a
``LlamaConfig``, saved once to bench/_work and loaded by path through ``ia3cli.models.loading.load_base`` (the code
path a
hub id takes). Training: IA3 wrapped by ``ia3cli.tuners.ia3.wrap`` with ia3cli's targets, AdamW, batch 2 x 128
tokens.
4-bit is ia3cli's default 4-bit recipe: NF4, double quantisation, float32 compute and float32 non-quantised parts
(``4bit``); ``4bit-bf16`` also stores the non-quantised parts (embeddings, norms) in bfloat16.

Target: 4-bit weights <= 0.4x of float32 (weights-only ratio); process peak ratios are reported beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from _common import QUICK, WORK, causal_recipe, llama_100m_dir, verdict, write_result

CONFIGS = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "4bit": {"quantization": "4bit"},
    "4bit-bf16": {"quantization": "4bit", "dtype": "bfloat16", "bnb_4bit_compute_dtype": "bfloat16"},
}
STEPS = 1 if QUICK else 3
BATCH, SEQ = 2, 128


def vm_hwm_mib() -> float:
    """Peak resident set size of this process so far, in MiB (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mib() -> dict[str, float]:
    """Current resident memory of this process, in MiB: total (VmRSS), anonymous and file-backed parts.

    File-backed pages are mostly the memory-mapped safetensors checkpoint: counted in VmRSS/VmHWM, but clean and
    reclaimable by the kernel; anonymous pages are the memory the process really holds.
    """
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(line.split()[1]) / 1024
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"]}


def child(config: str, model_dir: str) -> None:
    """Load and train one configuration; print one JSON line."""
    import torch

    from ia3cli.models import loading as modeling
    from ia3cli.models import targets
    from ia3cli.tuners import ia3

    after_import = vm_hwm_mib()
    recipe = causal_recipe(Path(model_dir), WORK / "memory", **CONFIGS[config])
    t0 = time.perf_counter()
    base = modeling.load_base(recipe.model)
    load_s = time.perf_counter() - t0
    weights = base.get_memory_footprint()
    after_load = vm_hwm_mib()
    rss_after_load = rss_mib()
    plan = targets.resolve(recipe.model, recipe.adapter, recipe.model.task)
    model = ia3.wrap(base, recipe, plan)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    ids = torch.randint(3, 32000, (BATCH, SEQ))
    t0 = time.perf_counter()
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - t0) / STEPS
    print(
        json.dumps(
            {
                "config": config,
                "weights_bytes": weights,
                "peak_after_import_mib": after_import,
                "peak_after_load_mib": after_load,
                "rss_after_load_mib": rss_after_load,
                "peak_after_train_mib": vm_hwm_mib(),
                "rss_after_train_mib": rss_mib(),
                "load_s": load_s,
                "step_s": step_s,
                "loss": float(loss),
                "params": sum(p.numel() for p in base.parameters()),
            }
        )
    )


def main() -> None:
    model_dir = llama_100m_dir()
    runs = {}
    for config in CONFIGS:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", config, str(model_dir)] + (["--quick"] if QUICK else []),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"memory child {config} failed")
        runs[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(config, runs[config], flush=True)
    f32 = runs["float32"]
    ratios = {
        c: {
            "weights": r["weights_bytes"] / f32["weights_bytes"],
            "peak_load": r["peak_after_load_mib"] / f32["peak_after_load_mib"],
            "peak_train": r["peak_after_train_mib"] / f32["peak_after_train_mib"],
            "anon_after_train": r["rss_after_train_mib"]["anon"] / f32["rss_after_train_mib"]["anon"],
            "peak_train_above_imports": (r["peak_after_train_mib"] - r["peak_after_import_mib"])
            / (f32["peak_after_train_mib"] - f32["peak_after_import_mib"]),
        }
        for c, r in runs.items()
    }
    ok = ratios["4bit"]["weights"] <= 0.4
    rows = [
        [
            "memory",
            f"{c}: weights / peak load / peak train MiB (anon RSS after load, after train)",
            f"{r['weights_bytes'] / 2**20:.0f} / {r['peak_after_load_mib']:.0f} / {r['peak_after_train_mib']:.0f} "
            f"({r['rss_after_load_mib']['anon']:.0f}, {r['rss_after_train_mib']['anon']:.0f})",
            "",
            "",
        ]
        for c, r in runs.items()
    ]
    rows += [
        [
            "memory",
            f"{c} / float32: weights, peak load, peak train, anon after train",
            f"{q['weights']:.2f}x, {q['peak_load']:.2f}x, {q['peak_train']:.2f}x, {q['anon_after_train']:.2f}x",
            "weights <= 0.4x" if c == "4bit" else "",
            verdict(ok) if c == "4bit" else "",
        ]
        for c, q in ratios.items()
        if c != "float32"
    ]
    write_result(
        "memory",
        {
            "what": "get_memory_footprint() after load; VmHWM of a fresh process after imports, load, training",
            "target": "4-bit weights <= 0.4x float32",
            "settings": {
                "model": "random Llama, ~102M params (see _common.llama_100m_config)",
                "configs": CONFIGS,
                "train_steps": STEPS,
                "batch": BATCH,
                "seq_len": SEQ,
                "adapter": "IA3 (ia3cli targets)",
            },
            "runs": runs,
            "ratios": ratios,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        child(sys.argv[i + 1], sys.argv[i + 2])
    else:
        main()
