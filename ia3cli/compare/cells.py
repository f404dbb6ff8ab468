"""One cell of ``ia3 compare``: a trained method as an ordinary ia3cli run, or the base scored zero-shot / in context.

Each cell returns a dict for ``compare.json``: learning rate, steps, the compared metric and all eval metrics,
trainable parameters, stored bytes, seconds, peak memory. The per-cell recipe replaces ``adapter.method``, the data
(the cell's folder of sampled rows), the seed, the learning rate and the step budget, and turns off evaluation
during training: the eval rows are scored once after the last step, so nothing is selected on them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ia3cli import __version__
from ia3cli.config.load import validate_mapping
from ia3cli.config.recipe import Recipe
from ia3cli.errors import RecipeError
from ia3cli.outputs import write_atomic

SWEEP_FACTORS = (0.3, 1.0, 3.0)


def cell_name(method: str, n: int, seed: int) -> str:
    """``<method>-n<N>-s<seed>``: the cell's key and run-dir name."""
    return f"{method}-n{n}-s{seed}"


def write_jsonl(path: Path, rows: Any) -> None:
    write_atomic(path, "".join(json.dumps(dict(r), ensure_ascii=False, default=str) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- per-cell recipes ----------------------------------------------------------------------------------------------


def cell_recipe(
    recipe: Recipe, method: str, n: int, seed: int, *, folder: Path, run_dir: Path, lr: float, steps: int, lora: dict
) -> Recipe:
    """The recipe one trained cell runs: the base recipe with method, data, seed, rate and step budget replaced."""
    raw = recipe.model_dump(mode="json")
    adapter = raw["adapter"]
    adapter["method"] = "ia3" if method.startswith("ia3") else method
    if method == "ia3-all":
        adapter["target_modules"], adapter["feedforward_modules"] = "all-linear", "auto"
    if method == "lora":
        adapter.update(lora)
    raw["data"].update(
        path=str(folder), name=None, train_split="train", eval_split="validation", train_samples=None, eval_samples=None
    )
    raw["training"].update(
        output_dir=str(run_dir),
        seed=seed,
        learning_rate=lr,
        max_steps=steps,
        eval_strategy="no",  # evaluated once after the last step: nothing is selected on the reported rows
        eval_on_start=False,  # the untouched base is the zero-shot cell (choice tasks); not repeated per cell
        save_strategy="no",
        load_best_model_at_end=False,
        early_stopping_patience=None,
        report_to=[],
    )
    return validate_mapping(raw)


# --- measuring -----------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 20 ms from /proc.

    Falls back to the process's lifetime peak (``getrusage``) where /proc is missing; on a GPU the block's peak
    allocated CUDA memory is recorded too.
    """

    def __enter__(self) -> PeakMemory:
        import threading

        self.rss_mib = self.gpu_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._cuda = _cuda_reset()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self.rss_mib = max(self.rss_mib, _rss_mib())
            if self._stop.wait(0.02):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_mib = max(self.rss_mib, _rss_mib())
        if self._cuda:
            import torch

            self.gpu_mib = torch.cuda.max_memory_allocated() / 2**20


def _rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cuda_reset() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.reset_peak_memory_stats()
    return True


def stored_bytes(run_dir: Path, method: str, trainable: int) -> int:
    """What a method stores per task: the adapter file (ia3, lora: head included), every weight file (full), or
    the head's weights in float32 (head: the run dir keeps a full model for ``ia3 eval``)."""
    if method == "head":
        return 4 * trainable
    names = ["adapter_model.safetensors"] if method != "full" else [p.name for p in run_dir.glob("*.safetensors")]
    return sum((run_dir / n).stat().st_size for n in names if (run_dir / n).is_file())


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "ia3cli": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


@contextlib.contextmanager
def silenced(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def metric_name(recipe: Recipe) -> str:
    """The metric compared: accuracy for classification and choice tasks, else the eval loss."""
    return "accuracy" if recipe.model.task == "seq-cls" or recipe.has_choices else "loss"


def trained_cell(
    recipe: Recipe,
    method: str,
    n: int,
    seed: int,
    folder: Path,
    out: Path,
    *,
    lr: float,
    steps: int,
    lora: dict,
    sweep_lr: bool,
    printer: Callable[[str], None],
) -> dict[str, Any]:
    """Train one cell into ``out/cells/<method>-n<N>-s<seed>`` and measure it.

    Args:
        recipe: The base recipe.
        method: ``ia3``, ``ia3-all``, ``lora``, ``full`` or ``head``.
        n: Training rows.
        seed: The cell's seed.
        folder: The cell's data folder (train.jsonl, validation.jsonl).
        out: The comparison's folder.
        lr: Learning rate (the sweep's centre when ``sweep_lr``).
        steps: Optimiser steps.
        lora: ``adapter.lora_*`` values for LoRA cells.
        sweep_lr: Pick the rate with :func:`sweep` first.
        printer: Receives the training run's lines.

    Raises:
        RunError: when training fails.
    """
    from ia3cli.training import run as train

    cell: dict[str, Any] = {}
    if sweep_lr:
        lr, cell["sweep"] = sweep(recipe, method, n, seed, folder, out, lr, steps, lora, printer)
    run_dir = out / "cells" / cell_name(method, n, seed)
    cell_rec = cell_recipe(recipe, method, n, seed, folder=folder, run_dir=run_dir, lr=lr, steps=steps, lora=lora)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        result = train.run(cell_rec, overwrite=True, printer=printer)
    m = result.metrics
    key = f"eval_{metric_name(recipe)}"
    cell.update(
        lr=lr,
        steps=m.get("global_step"),
        metric=m.get(key),
        metrics={k: v for k, v in m.items() if k.startswith("eval_") and not k.endswith(("_runtime", "_second"))},
        params=m.get("trainable_params"),
        bytes=stored_bytes(run_dir, cell_rec.adapter.method, m.get("trainable_params") or 0),
        train_seconds=m.get("train_runtime"),
        seconds=time.perf_counter() - t0,
        peak_rss_mib=round(mem.rss_mib, 1),
        peak_gpu_mib=round(mem.gpu_mib, 1) if mem.gpu_mib else None,
        run_dir=str(run_dir),
        data=str(folder),
    )
    return cell


def sweep(
    recipe: Recipe,
    method: str,
    n: int,
    seed: int,
    folder: Path,
    out: Path,
    lr: float,
    steps: int,
    lora: dict,
    printer: Callable[[str], None],
) -> tuple[float, dict[str, float]]:
    """Pick a learning rate from ``SWEEP_FACTORS x lr``: train on 3/4 of the cell's rows, score on the other 1/4.

    Raises:
        RecipeError: on ``--sweep`` when the cell has fewer than 4 rows to split.
    """
    from ia3cli.training import run as train

    if n < 4:
        raise RecipeError("--sweep", f"N={n} is too small to carve selection rows from", "use N >= 4")
    rows = read_jsonl(folder / "train.jsonl")
    cut = max(1, n // 4)
    carve = out / "sweep" / f"n{n}-s{seed}"
    write_jsonl(carve / "train.jsonl", rows[cut:])
    write_jsonl(carve / "validation.jsonl", rows[:cut])  # the selection rows: part of the training sample
    higher = metric_name(recipe) != "loss"
    scores: dict[str, float] = {}
    for factor in SWEEP_FACTORS:
        cand = float(f"{lr * factor:.3g}")
        run_dir = out / "sweep" / f"{cell_name(method, n, seed)}-lr{cand:g}"
        rec = cell_recipe(
            recipe, method, n, seed, folder=carve.resolve(), run_dir=run_dir, lr=cand, steps=steps, lora=lora
        )
        value = train.run(rec, overwrite=True, printer=printer).metrics.get(f"eval_{metric_name(recipe)}")
        scores[f"{cand:g}"] = (
            value if value is not None and math.isfinite(value) else (-math.inf if higher else math.inf)
        )
    best = (max if higher else min)(scores, key=lambda k: scores[k])
    return float(best), scores


def base_cell(
    recipe: Recipe,
    method: str,
    n: int,
    seed: int,
    folder: Path,
    icl_k: int | None,
    base: dict[str, Any],
    device: str | None = None,
) -> dict[str, Any]:
    """Zero-shot or in-context rank classification with the untouched base (loaded once on ``device``, kept in
    ``base``)."""
    from ia3cli.data import icl
    from ia3cli.models import loading as modeling
    from ia3cli.scoring import evaluation

    t0 = time.perf_counter()
    with PeakMemory() as mem:
        if "model" not in base:
            base["tokenizer"] = modeling.load_tokenizer(recipe.model)
            base["model"] = modeling.load_recipe_base(recipe, base["tokenizer"], device)
        model, tokenizer = base["model"], base["tokenizer"]
        evals = read_jsonl(folder / "validation.jsonl")
        scored, k = recipe, 0
        if method == "icl":
            scored, k = icl.recipe_with_demonstrations(
                recipe, tokenizer, model, read_jsonl(folder / "train.jsonl"), evals, icl_k
            )
        key = (method, scored.data.prompt_template)
        if key not in base:  # same demonstrations (N=16 and N=64 share their first rows): same scores
            batch = recipe.training.eval_batch_size or 2 * recipe.training.batch_size
            base[key] = evaluation.rank_classify(model, tokenizer, scored, evals, batch, share_prefix=method == "icl")
        metrics = base[key]
    return {
        "lr": None,
        "steps": 0,
        "k": k if method == "icl" else None,
        "metric": metrics.get(metric_name(recipe)),
        "metrics": {f"eval_{k_}": v for k_, v in metrics.items()},
        "params": 0,
        "bytes": 0,
        "train_seconds": 0.0,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": round(mem.rss_mib, 1),
        "peak_gpu_mib": round(mem.gpu_mib, 1) if mem.gpu_mib else None,
        "data": str(folder),
    }
