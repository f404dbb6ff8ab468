"""Few-shot quality: dev accuracy of the quick-start model after training on 16, 64 and 256 rows.

Methods (all on the quick-start all-MiniLM-L6-v2 with a fresh 2-class head, which every method trains):

- ``ia3``: ``ia3cli.train.run`` on the quick-start recipe (ia3cli's IA3 targets, head in ``modules_to_save``);
- ``lora_r4``: PEFT ``LoraConfig(r=4, lora_alpha=8)``, default BERT targets (query, value), head trained;
- ``head``: only the classifier head is trained (the base is frozen);
- ``full``: every parameter is trained.

Fair settings: the training rows are the same for every method (``data.train_samples`` sampled with the run's seed
by ia3cli), the non-IA3 methods use ia3cli's own data pipeline and ``training_arguments`` (so the same collator,
length grouping, batch size 16, linear schedule with 10% warm-up, clipping at 1.0), and every run takes the same
fixed number of optimiser steps whatever the data size (60; 16 rows then means 60 epochs, 256 rows ~4). Learning
rates are per method, the usual values for each (tuned-ish, not searched here): IA3 1e-2 (the quick-start
recipe), LoRA 1e-3, head-only 1e-2, full fine-tuning 5e-5. Accuracy is on all 100 dev rows after the last step
(no checkpoint selection). Three seeds each; mean and standard deviation, plus a plot: results/fewshot.png.

Target: none fixed; this says how well IA3 does with few examples next to the alternatives.
"""

from __future__ import annotations

import shutil
import time

from _common import QUICK, RESULTS, WORK, median, quickstart_recipe, quiet, stdev, write_result

SIZES = [16, 64, 256]
SEEDS = [0] if QUICK else [0, 1, 2]
STEPS = 8 if QUICK else 60
BATCH = 16
LR = {"ia3": 1e-2, "lora_r4": 1e-3, "head": 1e-2, "full": 5e-5}


def recipe_for(method: str, n: int, seed: int):
    out = WORK / f"fewshot-{method}"
    shutil.rmtree(out, ignore_errors=True)
    return quickstart_recipe(
        out,
        data={"train_samples": n},
        training={
            "max_steps": STEPS,
            "batch_size": BATCH,
            "seed": seed,
            "learning_rate": LR[method],
            "eval_strategy": "no",
            "save_strategy": "no",
            "load_best_model_at_end": False,
            "logging_steps": 50,
        },
        monitor={"every_steps": 1000},
    )


def train_other(method: str, recipe) -> float:
    """LoRA / head-only / full fine-tuning through ia3cli's data pipeline and TrainingArguments."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, set_seed

    from ia3cli import data, evaluation, modeling
    from ia3cli.train import training_arguments

    set_seed(recipe.training.seed)
    tokenizer = modeling.load_tokenizer(recipe.model)
    model = modeling.load_base(recipe.model, recipe.num_labels, pad_token_id=tokenizer.pad_token_id)
    if method == "lora_r4":
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8))
    elif method == "head":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier.")
    train_ds, eval_ds, collator = data.build(recipe, tokenizer)
    trainer = Trainer(
        model=model,
        args=training_arguments(recipe, recipe_out(recipe)),
        train_dataset=train_ds,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=evaluation.trainer_metrics(recipe.num_labels),
    )
    trainer.train()
    return trainer.evaluate(eval_ds)["eval_accuracy"]


def recipe_out(recipe):
    from pathlib import Path

    return Path(recipe.training.output_dir)


def train_ia3(recipe) -> float:
    from ia3cli.train import run

    return run(recipe, overwrite=True, printer=quiet, report=False).metrics["eval_accuracy"]


def plot(summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_n in summary.items():
        ns = sorted(int(n) for n in by_n)
        means = [by_n[str(n)]["mean"] for n in ns]
        stds = [by_n[str(n)]["std"] for n in ns]
        ax.errorbar(ns, means, yerr=stds, marker="o", capsize=3, label=f"{method} (lr {LR[method]:g})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(SIZES, [str(n) for n in SIZES])
    ax.set_xlabel("training rows")
    ax.set_ylabel("dev accuracy (100 rows)")
    ax.set_title(f"all-MiniLM-L6-v2, {STEPS} steps x batch {BATCH}, {len(SEEDS)} seed(s)")
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "fewshot.png", dpi=120)


def main() -> None:
    runs = []
    for seed in SEEDS:
        for n in SIZES:
            for method in LR:
                recipe = recipe_for(method, n, seed)
                t0 = time.perf_counter()
                acc = train_ia3(recipe) if method == "ia3" else train_other(method, recipe)
                runs.append(
                    {"method": method, "rows": n, "seed": seed, "accuracy": acc, "wall_s": time.perf_counter() - t0}
                )
                print(runs[-1], flush=True)
    summary: dict = {}
    for method in LR:
        summary[method] = {}
        for n in SIZES:
            accs = [r["accuracy"] for r in runs if r["method"] == method and r["rows"] == n]
            summary[method][str(n)] = {"mean": sum(accs) / len(accs), "std": stdev(accs), "median": median(accs)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(summary)
    rows = [
        [
            "fewshot",
            f"{method} dev acc at 16 / 64 / 256 rows",
            " / ".join(f"{summary[method][str(n)]['mean']:.2f}±{summary[method][str(n)]['std']:.2f}" for n in SIZES),
            "report",
            "",
        ]
        for method in LR
    ]
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
                "learning_rates": LR,
                "schedule": "linear, 10% warm-up, clip 1.0",
                "eval": "100 dev rows, last step",
            },
            "runs": runs,
            "summary": summary,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
