"""Run the ia3cli benchmarks and collect their results into bench/results/README.md.

    python bench/run_all.py                   # everything (about 30 minutes on 2 cores, 1 torch thread)
    python bench/run_all.py --quick           # smoke run (~3 min): fewer repeats and steps; numbers are not meaningful,
                                              # written to bench/_work/results-quick
    python bench/run_all.py floor startup     # a subset, by script name
    python bench/run_all.py fewshot_causal    # the few-shot recipe on three tasks (hours; only when named)
    python bench/run_all.py export            # ia3 export of the causal quick start (trains it first; only when named)
    python bench/run_all.py --table           # only rewrite results/README.md from the result files

Each benchmark is its own script (one subprocess each, so memory and imports do not carry over) and writes
bench/results/<name>.json. This script then prints one markdown table of every result and writes it, with the
machine description, to bench/results/README.md. BENCH_THREADS sets torch's threads (default 1, see _common.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"  # --quick: bench/_work/results-quick (smoke numbers never replace real ones)
# Cheapest first; the heavy training benchmarks last.
BENCHMARKS = [
    "startup", "adapter_size", "floor", "memory", "monitor_cost", "baseline_cost", "mixed", "throughput", "fewshot",
    "serve", "serve_latency", "scale",
]  # fmt: skip
# Run only when named (hours on 2 cores; gpu.py needs CUDA); their results still go into the table.
LONG = ["fewshot_causal", "gpu", "export"]


def table(results: Path) -> str:
    lines = ["| benchmark | measure | value | target | verdict |", "|---|---|---|---|---|"]
    for name in BENCHMARKS + LONG:
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        mark = " (quick)" if result.get("quick") else ""
        for row in result.get("rows", []):
            lines.append("| " + " | ".join([row[0] + mark, *[str(c) for c in row[1:]]]) + " |")
    return "\n".join(lines)


def machine_line(results: Path) -> str:
    for name in BENCHMARKS:
        path = results / f"{name}.json"
        if path.is_file():
            m = json.loads(path.read_text())["machine"]
            return (
                f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch thread(s)), {m['memory_gib']} GiB, "
                f"CUDA: {m['cuda']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
                f"peft {m['peft']}; {m['date']}"
            )
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats and steps")
    parser.add_argument("--table", action="store_true", help="run nothing; rewrite README.md from the results")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS + LONG]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS + LONG}")
    results = BENCH / "_work" / "results-quick" if args.quick else RESULTS
    failed = []
    for name in [] if args.table else args.names or BENCHMARKS:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py")] + (["--quick"] if args.quick else []))
        print(f"== {name}: exit {proc.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode != 0:
            failed.append(name)
    text = (
        "# ia3cli benchmarks\n\n"
        f"Machine: {machine_line(results)}.\n\n"
        "Reproduce: `make bench` (all but fewshot_causal, ~30 min on 2 cores) or `python bench/run_all.py NAME...`; "
        "raw numbers and "
        "settings in `bench/results/<name>.json`.\n\n" + table(results) + "\n"
    )
    results.mkdir(parents=True, exist_ok=True)
    (results / "README.md").write_text(text)
    print(text)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
