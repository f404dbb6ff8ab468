"""Step-0 baseline cost: the quick start with and without ``training.eval_on_start``.

The step-0 evaluation scores the untouched model once on the eval split before the first optimiser step. This runs
the quick-start recipe as shipped (200 steps, an evaluation per epoch) with ``eval_on_start`` true and false,
alternating, and reads from each run's own files:

- the run's wall time: ``run.json``'s ``started`` to the last file written (``report.png``, else ``metrics.json``);
- the step-0 evaluation's ``eval_runtime`` and the Trainer's ``train_runtime`` from ``logs/train_log.jsonl`` and
  ``metrics.json``.

Whole-run wall times on a shared 2-core machine move by more than the effect measured, so the step-0 evaluation's
own time as a share of the same run's training time is reported too: a reading against a baseline in the same run.

``--runs ON OFF`` reads two run dirs made by ``ia3 train recipes/quickstart.yaml --set training.eval_on_start=...``
instead of training (the same numbers, from the same files).

Target: the step-0 evaluation adds less than 10% to the quick start's wall time.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

from _common import QUICK, WORK, median, quickstart_recipe, quiet, verdict, write_result

PAIRS = 3
TARGET = 0.10


def train(eval_on_start: bool, index: int) -> Path:
    from ia3cli.training import run as training

    out = WORK / f"baseline-cost-{'on' if eval_on_start else 'off'}-{index}"
    shutil.rmtree(out, ignore_errors=True)
    settings = {"eval_on_start": eval_on_start}
    if QUICK:
        settings.update(max_steps=20, eval_strategy="steps", eval_steps=10, save_strategy="steps", save_steps=10)
    training.run(quickstart_recipe(out, training=settings), overwrite=True, printer=quiet)
    return out


def read(run: Path) -> dict:
    """Wall time, training time and step-0 evaluation time of one run dir, from its files."""
    info = json.loads((run / "run.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    records = [json.loads(line) for line in (run / "logs" / "train_log.jsonl").read_text().splitlines()]
    step0 = next((r for r in records if r.get("step") == 0 and "eval_runtime" in r), None)
    last = run / "report.png" if (run / "report.png").is_file() else run / "metrics.json"
    started = datetime.strptime(info["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    return {
        "run": str(run),
        "eval_on_start": step0 is not None,
        "wall_s": round(last.stat().st_mtime - started, 1),
        "train_runtime_s": metrics["train_runtime"],
        "step0_eval_s": step0["eval_runtime"] if step0 else None,
        "baseline_accuracy": metrics.get("baseline_accuracy"),
        "majority_accuracy": metrics.get("majority_accuracy"),
        "eval_accuracy": metrics.get("eval_accuracy"),
        "steps": metrics["global_step"],
    }


def main() -> None:
    if "--runs" in sys.argv:
        on, off = (Path(p) for p in sys.argv[sys.argv.index("--runs") + 1 :][:2])
        runs = [read(on), read(off)]
    else:
        runs = [read(train(flag, i)) for i in range(PAIRS) for flag in (True, False)]
    with_eval = [r for r in runs if r["eval_on_start"]]
    without = [r for r in runs if not r["eval_on_start"]]
    wall_on, wall_off = median([r["wall_s"] for r in with_eval]), median([r["wall_s"] for r in without])
    added = wall_on / wall_off - 1
    share = median([r["step0_eval_s"] / r["train_runtime_s"] for r in with_eval])
    first = with_eval[0]
    write_result(
        "baseline_cost",
        {
            "what": "quick start with / without the step-0 evaluation (training.eval_on_start)",
            "settings": {"recipe": "recipes/quickstart.yaml", "pairs": len(with_eval), "quick": QUICK},
            "runs": runs,
            "wall_added": added,
            "step0_share_of_training": share,
            "rows": [
                ["baseline_cost", "wall s with / without step-0 eval", f"{wall_on:.0f} / {wall_off:.0f}", "", ""],
                [
                    "baseline_cost",
                    "added: whole-run wall time; step-0 eval / same run's training time",
                    f"{added:+.1%}; {share:.2%}",
                    "< 10%",
                    verdict(share < TARGET and added < TARGET),
                ],
                [
                    "baseline_cost",
                    "quick start: step-0 accuracy / majority class / final",
                    f"{first['baseline_accuracy']:.2f} / {first['majority_accuracy']:.2f} / "
                    f"{first['eval_accuracy']:.2f}",
                    "majority 0.5",
                    verdict(first["majority_accuracy"] == 0.5),
                ],
            ],
        },
    )


if __name__ == "__main__":
    main()
