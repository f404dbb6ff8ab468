"""Monitor cost: training steps per second on the quick-start run with and without the IA3 health monitor.

Measures ``train_steps_per_second`` of ``ia3cli.training.run.run`` on the quick-start recipe (batch 16, the recipe's
``monitor.every_steps: 50``; evaluation and checkpoints off so only training steps are timed), with the monitor
registered as ia3cli does and with every monitor entry point replaced by a no-op (no hooks, no work). Runs
alternate with / without; the cost is 1 - median(with) / median(without).

Whole-run timings on a shared 2-core machine move by several percent, more than the effect measured, so the
with-monitor runs also time every monitor entry point (the gradient hook, the post-backward norm computation and
each Trainer callback) and report that time as a share of the training time: a direct, noise-free reading.

Target: the monitor adds at most 3% to step time.
"""

from __future__ import annotations

import functools
import shutil
import time

from _common import QUICK, WORK, median, quickstart_recipe, quiet, verdict, write_result

STEPS = 10 if QUICK else 60
PAIRS = 1 if QUICK else 5
TIMED = (
    "_on_grad",
    "_measure_grads",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_step_end",
    "on_log",
    "on_epoch_end",
    "on_train_begin",
    "on_train_end",
)


def one_run(with_monitor: bool) -> dict:
    from ia3cli.training import run as train
    from ia3cli.training.monitor import GradNormMonitor

    spent = {"s": 0.0}
    originals = {name: getattr(GradNormMonitor, name) for name in TIMED}

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["s"] += time.perf_counter() - t0

        return wrapper

    try:
        if with_monitor:
            for name in TIMED:
                setattr(GradNormMonitor, name, timed(originals[name]))
        else:
            for name in TIMED:  # registered but idle: no hooks, no measurements, no callbacks' work
                setattr(GradNormMonitor, name, lambda self, *args, **kwargs: None)
        out = WORK / "monitor-cost"
        shutil.rmtree(out, ignore_errors=True)
        recipe = quickstart_recipe(
            out,
            training={
                "max_steps": STEPS,
                "eval_strategy": "no",
                "save_strategy": "no",
                "load_best_model_at_end": False,
                "logging_steps": 10,
            },
        )
        metrics = train.run(recipe, overwrite=True, printer=quiet).metrics
    finally:
        for name, fn in originals.items():
            setattr(GradNormMonitor, name, fn)
    return {
        "train_steps_per_second": metrics["train_steps_per_second"],
        "train_runtime": metrics["train_runtime"],
        "monitor_s": spent["s"],
        "monitor_share": spent["s"] / metrics["train_runtime"],
    }


def main() -> None:
    runs: dict[str, list[dict]] = {"with": [], "without": []}
    one_run(False)  # warm-up: file caches, first-import costs
    for i in range(PAIRS):
        for name in ("without", "with") if i % 2 == 0 else ("with", "without"):
            runs[name].append(one_run(name == "with"))
            print(name, runs[name][-1], flush=True)
    sps = {name: median([r["train_steps_per_second"] for r in rs]) for name, rs in runs.items()}
    cost = 1 - sps["with"] / sps["without"]
    share = median([r["monitor_share"] for r in runs["with"]])
    ok = share <= 0.03 and cost <= 0.03
    write_result(
        "monitor_cost",
        {
            "what": "train steps/s with and without GradNormMonitor (interleaved), plus time inside the monitor",
            "target": "<= 3% of step time",
            "settings": {"steps": STEPS, "pairs": PAIRS, "batch_size": 16, "every_steps": 50},
            "runs": runs,
            "median_steps_per_second": sps,
            "cost_from_throughput": cost,
            "median_time_share_in_monitor": share,
            "rows": [
                ["monitor_cost", "steps/s without / with monitor", f"{sps['without']:.2f} / {sps['with']:.2f}", "", ""],
                [
                    "monitor_cost",
                    "cost: throughput drop; time inside monitor",
                    f"{100 * cost:.1f}%; {100 * share:.2f}%",
                    "<= 3%",
                    verdict(ok),
                ],
            ],
        },
    )


if __name__ == "__main__":
    main()
