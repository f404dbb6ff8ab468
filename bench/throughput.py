"""Throughput: `ia3 train` against the PEFT + Trainer script people copy today.

Measures: training samples per second (the Trainer's ``train_samples_per_second``: the whole ``trainer.train()``
call, per-epoch evaluation included) and final dev accuracy, for

- baseline: the usual script (written out plainly in ``baseline()``): every row padded to max_length 128,
  ``IA3Config`` with PEFT's default targets for BERT, ``Trainer`` with the default collator, evaluation each epoch;
- ia3cli: ``ia3cli.training.run.run`` on the quick-start recipe (dynamic padding, length-grouped batches, its IA3
  targets,
  evaluation and best-checkpoint saving each epoch, the health monitor).

Same model (quick-start all-MiniLM-L6-v2), data (320 train / 100 dev rows), epochs, batch size 32 and learning
rate. Runs alternate baseline / ia3cli, and the ratio is taken from the medians.

Target: ia3cli >= 4x the baseline's samples/s, with equal or better accuracy.
"""

from __future__ import annotations

import shutil

from _common import MODEL_NAME, QUICK, SENTIMENT, WORK, Timer, median, quickstart_recipe, quiet, verdict, write_result

EPOCHS = 1 if QUICK else 4
REPEATS = 1 if QUICK else 2
BATCH = 32
LR = 1e-2  # the quick-start recipe's rate, used by both


def baseline(out: str) -> dict:
    """The script users copy: pad to 128, PEFT default IA3 targets, default collator, eval each epoch."""
    import numpy as np
    from datasets import load_dataset
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from ia3cli.config.paths import resolve_model_path

    model_path = resolve_model_path(MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ds = load_dataset(
        "json",
        data_files={"train": str(SENTIMENT / "train.jsonl"), "validation": str(SENTIMENT / "dev.jsonl")},
    )

    def tokenize(batch):
        return tokenizer(batch["text"], padding="max_length", truncation=True, max_length=128)

    ds = ds.map(tokenize, batched=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = get_peft_model(model, IA3Config(task_type="SEQ_CLS"))

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}

    args = TrainingArguments(
        output_dir=out,
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        learning_rate=LR,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        seed=42,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        compute_metrics=compute_metrics,
    )
    train = trainer.train()
    final = trainer.evaluate()
    return {
        "train_samples_per_second": train.metrics["train_samples_per_second"],
        "train_runtime": train.metrics["train_runtime"],
        "eval_accuracy": final["eval_accuracy"],
    }


def ia3cli_run(out: str) -> dict:
    """``ia3 train recipes/quickstart.yaml`` with batch 32, through ``ia3cli.training.run.run``."""
    from ia3cli.training.run import run

    recipe = quickstart_recipe(
        WORK / out, training={"batch_size": BATCH, "epochs": EPOCHS, "learning_rate": LR, "output_dir": out}
    )
    result = run(recipe, overwrite=True, printer=quiet, report=False)
    return {
        "train_samples_per_second": result.metrics["train_samples_per_second"],
        "train_runtime": result.metrics["train_runtime"],
        "eval_accuracy": result.metrics["eval_accuracy"],
    }


def main() -> None:
    runs: dict[str, list[dict]] = {"baseline": [], "ia3cli": []}
    for i in range(REPEATS):
        for name, fn in (("baseline", baseline), ("ia3cli", ia3cli_run)):
            out = str(WORK / f"throughput-{name}")
            shutil.rmtree(out, ignore_errors=True)
            with Timer() as t:
                r = fn(out)
            r["wall_s"] = t.s
            runs[name].append(r)
            print(f"[{i}] {name}: {r}", flush=True)
    med = {
        name: {k: median([r[k] for r in rs]) for k in ("train_samples_per_second", "train_runtime", "wall_s")}
        for name, rs in runs.items()
    }
    acc = {name: median([r["eval_accuracy"] for r in rs]) for name, rs in runs.items()}
    ratio = med["ia3cli"]["train_samples_per_second"] / med["baseline"]["train_samples_per_second"]
    ok = ratio >= 4 and acc["ia3cli"] >= acc["baseline"]
    write_result(
        "throughput",
        {
            "what": "train samples/s of trainer.train() (eval each epoch included), ia3cli vs the copied script",
            "target": "ratio >= 4x with equal or better dev accuracy",
            "settings": {
                "epochs": EPOCHS,
                "batch_size": BATCH,
                "learning_rate": LR,
                "repeats": REPEATS,
                "baseline_padding": "max_length 128",
                "model": MODEL_NAME,
            },
            "runs": runs,
            "medians": med,
            "accuracy": acc,
            "ratio_samples_per_second": ratio,
            "rows": [
                [
                    "throughput",
                    "baseline train samples/s (acc)",
                    f"{med['baseline']['train_samples_per_second']:.1f} ({acc['baseline']:.2f})",
                    "",
                    "",
                ],
                [
                    "throughput",
                    "ia3cli train samples/s (acc)",
                    f"{med['ia3cli']['train_samples_per_second']:.1f} ({acc['ia3cli']:.2f})",
                    "",
                    "",
                ],
                ["throughput", "ratio ia3cli / baseline", f"{ratio:.2f}x", ">= 4x, acc >=", verdict(ok)],
            ],
        },
    )


if __name__ == "__main__":
    main()
