"""Few-shot quality: dev accuracy of the quick-start model after training on 16, 64 and 256 rows, by method.

A thin wrapper over ``ia3cli.compare.run.run`` (what ``ia3 compare`` runs), on the quick-start all-MiniLM-L6-v2 with a
fresh 2-class head, which every method trains:

- ``ia3``: the quick-start recipe as written (ia3cli's IA3 targets, head in ``modules_to_save``), lr 1e-2;
- ``lora``: PEFT LoRA r=4 (alpha 8) on the query/value projections, head trained, lr 5e-4 (compare's default);
- ``head``: only the classifier head (a linear probe), lr 1e-3 (compare's default);
- ``full``: every parameter, lr 5e-5 (compare's default).

Fair settings (all from ``ia3 compare``): for each N and seed the training rows are drawn once and every method
trains on that same file; the same data pipeline, batch size 16, linear schedule with 10% warm-up and clipping at
1.0; every run takes the same fixed number of optimiser steps whatever the data size (60: 16 rows then means 60
epochs, 256 rows ~4). Accuracy is on all 100 dev rows after the last step (no checkpoint selection). Three seeds;
mean and standard deviation, the plot in results/fewshot.png and compare's own table and recommendation.

Target: none fixed; this says how well IA3 does with few examples next to the alternatives.
"""

from __future__ import annotations

import shutil

from _common import QUICK, RESULTS, WORK, quickstart_recipe, write_result

SIZES = [16] if QUICK else [16, 64, 256]
SEEDS = 1 if QUICK else 3
STEPS = 8 if QUICK else 60
BATCH = 16
METHODS = ["ia3", "lora", "head", "full"]


def main() -> None:
    from ia3cli.compare import run as compare
    from ia3cli.compare.summary import mean_std, values

    out = WORK / "fewshot-compare"
    recipe = quickstart_recipe(
        WORK / "fewshot-unused",
        training={"max_steps": STEPS, "batch_size": BATCH, "logging_steps": 50},
        monitor={"every_steps": 1000},
    )
    result = compare.run(recipe, METHODS, SIZES, SEEDS, out, overwrite=True, lora_r=4)
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "compare.png", RESULTS / "fewshot.png")
    summary = {
        m: {str(n): dict(zip(("mean", "std"), mean_std(values(result.cells, m, n)), strict=True)) for n in SIZES}
        for m in METHODS
    }
    runs = [{k: c.get(k) for k in ("method", "n", "seed", "lr", "metric", "params", "bytes", "seconds")}
            for c in result.cells]  # fmt: skip
    rows = [
        ["fewshot", f"{m} dev acc at {' / '.join(map(str, SIZES))} rows",
         " / ".join(f"{summary[m][str(n)]['mean']:.2f}±{summary[m][str(n)]['std']:.2f}" for n in SIZES), "report", ""]
        for m in METHODS
    ]  # fmt: skip
    write_result(
        "fewshot",
        {
            "what": "dev accuracy after a fixed step budget, by training-set size and method (mean ± std over seeds)",
            "target": "none (report); plot in results/fewshot.png",
            "settings": {
                "sizes": SIZES,
                "seeds": SEEDS,
                "steps": STEPS,
                "batch_size": BATCH,
                "learning_rates": {m: next(c["lr"] for c in result.cells if c["method"] == m) for m in METHODS},
                "schedule": "linear, 10% warm-up, clip 1.0",
                "eval": "100 dev rows, last step",
                "runner": "ia3cli.compare.run.run (ia3 compare)",
            },
            "runs": runs,
            "summary": summary,
            "recommendation": result.recommendation,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
