"""``ia3 compare``: IA3 next to LoRA, full fine-tuning, a linear probe, zero-shot and in-context learning.

One recipe, several methods, the same rows: for every training size N and seed, N rows are drawn once from the
recipe's training split (:func:`ia3cli.data.sources.sample`, seeded by the seed) and written to
``OUT/data/n<N>-s<seed>/``
together with the evaluation rows (the recipe's eval split, ``data.eval_samples`` drawn with the recipe's seed,
identical for every cell). Every method of that N and seed reads that folder, so they see the same rows.

- Trained methods (``ia3``, ``ia3-all``, ``lora``, ``full``, ``head``) are ordinary ia3cli runs: a per-cell recipe
  (``adapter.method``, learning rate, seed, step budget, the cell's data folder) trained by
  :func:`ia3cli.training.run.run` into ``OUT/cells/<method>-n<N>-s<seed>/``; ``ia3 eval`` and ``ia3 merge`` work on
  them.
  Every method gets the same number of optimiser steps: ``training.max_steps`` when the recipe sets it, else
  ``max(50, ceil(epochs * N / (batch_size * gradient_accumulation_steps)))``. Evaluation happens once, after the
  last step (no checkpoint selection on the reported rows).
- ``zero-shot``: rank classification (:func:`ia3cli.scoring.evaluation.rank_classify`) of the untouched base.
- ``icl``: the first k rows of the cell's sample, rendered with the recipe's template and target, are prepended to
  every evaluation prompt, then rank classification (see :mod:`ia3cli.data.icl` for how many fit).

``OUT/compare.json`` holds every finished cell (rewritten atomically after each) and marks OUT as ia3cli's;
``--resume`` skips finished cells. ``compare.png`` plots the metric against N, and a one-line recommendation is
derived from the numbers. Learning rates default per method (:data:`DEFAULT_LR`), ``--lr METHOD=VALUE`` overrides,
and ``sweep`` picks one per cell from :data:`ia3cli.compare.cells.SWEEP_FACTORS` x the default on a quarter of
the cell's own training rows (never on the evaluation rows).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia3cli.compare import cells as compare_cells
from ia3cli.compare.cells import cell_name, metric_name, write_jsonl
from ia3cli.compare.summary import plot, recommendation, table
from ia3cli.config.load import dump_recipe
from ia3cli.config.recipe import Recipe
from ia3cli.errors import Ia3Error, RecipeError
from ia3cli.models.device import resolve as resolve_device
from ia3cli.outputs import COMPARE_MARKER, remove_output, write_atomic
from ia3cli.scoring.chance import majority_of
from ia3cli.training.budget import MIN_STEPS, compare_budget

METHODS = ("zero-shot", "icl", "ia3", "ia3-all", "lora", "full", "head")
TRAINED = ("ia3", "ia3-all", "lora", "full", "head")
# Conventional learning rates. IA3: the recipe's own (the schema default 3e-3 is T-Few's, Liu et al. 2022).
# LoRA: 5e-4, the LoRA paper's RoBERTa-base GLUE setting (Hu et al. 2021, table 9). Full fine-tuning: 5e-5, the top
# of BERT's recommended 2e-5..5e-5 (Devlin et al. 2019, appendix A.3). Head only: 1e-3, Adam's default step size
# (Kingma & Ba 2015), the usual linear-probe rate.
DEFAULT_LR = {"lora": 5e-4, "full": 5e-5, "head": 1e-3}
COMPARE_VERSION = 1


@dataclass
class CompareResult:
    """What ``compare.run`` produced: every cell, the rendered table and the recommendation."""

    out: Path
    cells: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""
    recommendation: str = ""
    trained: int = 0  # cells computed in this call (the rest came from compare.json)


def applicable(recipe: Recipe) -> list[str]:
    """The methods that make sense for the recipe's task, in display order."""
    task, choices = recipe.model.task, recipe.has_choices
    names = ["zero-shot"] if choices else []
    names += ["icl"] if choices and task == "causal-lm" else []
    names += ["ia3", "ia3-all", "lora", "full"]
    return names + (["head"] if task == "seq-cls" else [])


def check_methods(recipe: Recipe, methods: Sequence[str] | None) -> list[str]:
    """The requested methods (default: all applicable), validated.

    Raises:
        RecipeError: on ``--methods`` for an unknown method or one the task does not support.
    """
    allowed = applicable(recipe)
    if not methods:
        return allowed
    why = {
        "zero-shot": "needs a causal-lm/seq2seq recipe with data.label_names (rank classification)",
        "icl": "needs a causal-lm recipe with data.label_names (rank classification)",
        "head": "trains a classification head: seq-cls only",
    }
    for m in methods:
        if m not in METHODS:
            raise RecipeError("--methods", f"unknown method '{m}'", f"choose from {', '.join(METHODS)}")
        if m not in allowed:
            raise RecipeError(
                "--methods",
                f"'{m}' does not apply to task '{recipe.model.task}': it {why.get(m, 'is not available')}",
                f"methods for this recipe: {', '.join(allowed)}",
            )
    return list(dict.fromkeys(methods))


def parse_lr(items: Sequence[str]) -> dict[str, float]:
    """``METHOD=VALUE`` strings into a dict.

    Raises:
        RecipeError: on ``--lr`` for a malformed item, an unknown or untrained method, or a non-positive value.
    """
    rates: dict[str, float] = {}
    for item in items:
        method, _, raw = item.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if method not in TRAINED or value <= 0:
            raise RecipeError("--lr", f"'{item}' is not METHOD=VALUE", f"e.g. --lr lora=1e-3 (methods: {TRAINED})")
        rates[method] = value
    return rates


def learning_rate(recipe: Recipe, method: str, overrides: dict[str, float]) -> float:
    """The learning rate a method trains with: ``--lr``, else the recipe's for IA3, else :data:`DEFAULT_LR`."""
    if method in overrides:
        return overrides[method]
    return recipe.training.learning_rate if method.startswith("ia3") else DEFAULT_LR[method]


def lora_settings(recipe: Recipe, lora_r: int | None, lora_targets: str | list[str] | None) -> dict[str, Any]:
    """The LoRA cells' rank and targets: the flags where given, else the recipe's ``adapter.lora_*`` keys."""
    a = recipe.adapter
    return {"lora_r": lora_r or a.lora_r, "lora_targets": lora_targets or a.lora_targets}


def step_budget(recipe: Recipe, n: int) -> int:
    """Optimiser steps every method gets at N rows (see the module docstring)."""
    return compare_budget(recipe.training, n)


# --- the rows ------------------------------------------------------------------------------------------------------


def draw_rows(recipe: Recipe, rows: Sequence[int], seeds: Sequence[int]) -> tuple[dict[tuple[int, int], Any], Any]:
    """Sample every (N, seed) training set once (``data.sample`` seeded by the seed, from the whole training split:
    ``--rows`` replaces ``data.train_samples``) and the shared eval rows; every row checked.

    Returns:
        ``{(N, seed): rows}`` and the eval rows (``data.eval_samples`` drawn with the recipe's seed).

    Raises:
        RecipeError: on ``--rows`` when N exceeds the training split; on ``data.eval_split`` when there is none.
        DataError: from loading or checking the rows.
    """
    from ia3cli.data.checks import check_rows
    from ia3cli.data.sources import load_split, sample

    d = recipe.data
    if d.eval_split is None:
        raise RecipeError("data.eval_split", "is null: compare needs an evaluation split", "set data.eval_split")
    train = load_split(d, d.train_split)
    too_big = [n for n in rows if n > len(train)]
    if too_big:
        raise RecipeError(
            "--rows",
            f"N={max(too_big)} but the training split '{d.train_split}' of {d.path} has {len(train)} rows",
            f"use --rows up to {len(train)}",
        )
    evals = sample(load_split(d, d.eval_split), d.eval_samples, recipe.training.seed)
    check_rows(evals, recipe, f"{d.path} [{d.eval_split}]")
    drawn = {(n, seed): sample(train, n, seed) for seed in seeds for n in rows}
    for chosen in drawn.values():
        check_rows(chosen, recipe, f"{d.path} [{d.train_split}]")
    return drawn, evals


def write_rows(drawn: dict[tuple[int, int], Any], evals: Any, out: Path) -> dict[tuple[int, int], Path]:
    """One folder per (N, seed) under ``out/data``: ``train.jsonl`` (the sample) and ``validation.jsonl`` (the
    eval rows, the same in every folder). Every method of that N and seed trains and evaluates on that folder."""
    folders: dict[tuple[int, int], Path] = {}
    for (n, seed), chosen in drawn.items():
        folder = out / "data" / f"n{n}-s{seed}"
        write_jsonl(folder / "train.jsonl", chosen)
        write_jsonl(folder / "validation.jsonl", evals)
        folders[(n, seed)] = folder.resolve()
    return folders


# --- the run -------------------------------------------------------------------------------------------------------


def _claim(out: Path, recipe: Recipe, settings: dict[str, Any], *, resume: bool, overwrite: bool) -> list[dict]:
    """Create OUT or reuse it (``resume``); returns the finished cells found there.

    Raises:
        Ia3Error: when OUT holds something else, or (``resume``) a comparison of another recipe or settings.
    """
    marker = out / COMPARE_MARKER
    if out.is_dir() and any(out.iterdir()):
        if resume and marker.is_file():
            saved = json.loads(marker.read_text(encoding="utf-8"))
            if saved.get("recipe") != dump_recipe(recipe) or saved.get("settings") != settings:
                raise Ia3Error(
                    f"--out: {out} holds a comparison of a different recipe or settings",
                    "resume with the same recipe, --set, --lora-*, --icl-k and --sweep, or pass --overwrite",
                )
            return list(saved.get("cells", []))
        if not overwrite:
            what = "it is not an ia3 compare output" if not marker.is_file() else "it holds an earlier comparison"
            raise Ia3Error(f"--out: {out} is not empty ({what})", "pass --resume to continue it, --overwrite to redo")
        remove_output(out, COMPARE_MARKER, key="--out", flag="--overwrite", keep=_protected(recipe))
    elif resume:
        raise Ia3Error(f"--resume: no comparison to resume in {out}", "drop --resume to start one")
    out.mkdir(parents=True, exist_ok=True)
    return []


def _protected(recipe: Recipe) -> tuple[Path, ...]:
    from ia3cli.training.rundir import protected_folders

    return protected_folders(recipe)


def run(
    recipe: Recipe,
    methods: Sequence[str] | None = None,
    rows: Sequence[int] = (16, 64, 256),
    seeds: int | Sequence[int] = 3,
    out: str | Path = "runs/compare",
    *,
    resume: bool = False,
    overwrite: bool = False,
    lora_r: int | None = None,
    lora_targets: str | list[str] | None = None,
    lr: dict[str, float] | None = None,
    icl_k: int | None = None,
    sweep: bool = False,
    printer: Callable[[str], None] = print,
    verbose: bool = False,
    device: str = "auto",
) -> CompareResult:
    """Run every method on the same rows for each N and seed; write ``compare.json``, ``compare.png``, a table.

    Args:
        recipe: A validated recipe (its task decides which methods apply).
        methods: Methods to run (default: all that apply); see :data:`METHODS`.
        rows: Training-set sizes N.
        seeds: How many seeds (0..S-1), or the seeds themselves.
        out: Output folder (``compare.json`` marks it as ia3cli's).
        resume: Reuse OUT's finished cells; refused when OUT compared another recipe or settings.
        overwrite: Replace an earlier comparison in OUT.
        lora_r: LoRA rank (default: the recipe's ``adapter.lora_r``); alpha is always ``adapter.lora_alpha``.
        lora_targets: ``attention`` (query/value), ``all-linear``, or suffixes (default: ``adapter.lora_targets``).
        lr: Per-method learning rates replacing the defaults.
        icl_k: Demonstrations per prompt for ``icl`` (default: as many as fit).
        sweep: Pick each trained cell's learning rate on rows carved from its own training sample.
        printer: Receives progress lines and the table.
        verbose: Pass each training run's own lines to ``printer`` too.
        device: Where the zero-shot and icl cells run (``--device``); trained cells train where the Trainer does.

    Raises:
        RecipeError: unknown or inapplicable method, N larger than the data, no eval split, bad ``--lr``.
        Ia3Error: OUT holds something else; RunError: a cell's training failed.
    """
    from ia3cli.training import preflight

    methods, rows, seed_list = _grid(recipe, methods, rows, seeds, device)
    out = Path(out).expanduser()
    lora = lora_settings(recipe, lora_r, lora_targets)
    settings = {"lora": lora, "icl_k": icl_k, "sweep": sweep, "rates": dict(lr or {}), "min_steps": MIN_STEPS}
    preflight.run(recipe)  # every recipe and data problem before anything is written
    drawn, evals = draw_rows(recipe, rows, seed_list)
    done = _claim(out, recipe, settings, resume=resume, overwrite=overwrite)
    folders = write_rows(drawn, evals, out)
    state = {"recipe": dump_recipe(recipe), "settings": settings, "cells": done, **_references(recipe, evals)}
    finished = {c["cell"] for c in done}

    plan = cell_order(methods, rows, seed_list)
    todo = [p for p in plan if cell_name(*p) not in finished]
    printer(
        f"compare: {len(plan)} cells ({len(plan) - len(todo)} done), methods {', '.join(methods)}, N {rows}, "
        f"seeds {seed_list} -> {out}"
    )
    quiet = printer if verbose else (lambda _line: None)
    base: dict[str, Any] = {}
    started, computed = time.perf_counter(), 0
    for method, n, seed in todo:
        name = cell_name(method, n, seed)
        folder = folders.get((n, seed)) or folders[(rows[0], seed_list[0])]
        cell = _compute_cell(recipe, method, n, seed, folder, out, settings, base, verbose, quiet, device)
        cell.update(cell=name, method=method, n=n, seed=seed)
        state["cells"] = [c for c in state["cells"] if c["cell"] != name] + [cell]
        _save(out, state, methods, rows, seed_list, recipe)
        computed += 1
        eta = (time.perf_counter() - started) / computed * (len(todo) - computed)
        printer(f"[{len(plan) - len(todo) + computed}/{len(plan)}] {name}: {_cell_line(cell, state['metric'], eta)}")
    base.clear()
    result = _save(out, state, methods, rows, seed_list, recipe, final=True)
    printer(result.table)
    printer(result.recommendation)
    printer(f"wrote {out / COMPARE_MARKER} and {out / 'compare.png'}")
    result.trained = computed
    return result


def _grid(
    recipe: Recipe, methods: Sequence[str] | None, rows: Sequence[int], seeds: int | Sequence[int], device: str
) -> tuple[list[str], list[int], list[int]]:
    """The methods, sizes N and seeds compared, checked (and the device they run on, before anything is written)."""
    resolve_device(device)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    sizes = sorted({int(n) for n in rows})
    if not sizes or sizes[0] < 1 or not seed_list:
        raise RecipeError("--rows", "needs at least one N >= 1 and one seed", "e.g. --rows 16,64 --seeds 3")
    return check_methods(recipe, methods), sizes, seed_list


def _compute_cell(
    recipe: Recipe,
    method: str,
    n: int,
    seed: int,
    folder: Path,
    out: Path,
    settings: dict[str, Any],
    base: dict[str, Any],
    verbose: bool,
    printer: Callable[[str], None],
    device: str | None = None,
) -> dict[str, Any]:
    """One cell: a trained method as an ia3cli run, or the untouched base on ``device`` (kept in ``base`` for the
    next cell)."""
    if method in TRAINED and base:  # the trained cells' peak memory must not include the untouched base
        base.clear()
        gc.collect()
    with compare_cells.silenced(not verbose):  # the Trainer's progress bars and log dicts, once per cell
        if method not in TRAINED:
            return compare_cells.base_cell(recipe, method, n, seed, folder, settings["icl_k"], base, device)
        rates = settings["rates"]
        return compare_cells.trained_cell(
            recipe, method, n, seed, folder, out, lr=learning_rate(recipe, method, rates), steps=step_budget(recipe, n),
            lora=settings["lora"], sweep_lr=settings["sweep"] and method not in rates, printer=printer,
        )  # fmt: skip


def cell_order(methods: Sequence[str], rows: Sequence[int], seeds: Sequence[int]) -> list[tuple[str, int, int]]:
    """Every (method, N, seed) cell in the order they run: the untouched base (zero-shot, then ICL) first, loaded
    once for all its cells and released before the trained cells."""
    plan = [("zero-shot", 0, 0)] if "zero-shot" in methods else []
    plan += [(m, n, s) for s in seeds for n in rows for m in methods if m == "icl"]
    return plan + [(m, n, s) for s in seeds for n in rows for m in methods if m in TRAINED]


def _cell_line(cell: dict[str, Any], metric: str, eta: float) -> str:
    shown = f"{cell['metric']:.4f}" if cell.get("metric") is not None else "n/a"
    return f"{metric} {shown} (lr {cell.get('lr') or '-'}, {cell['seconds']:.0f} s) | ETA {_duration(eta)}"


def _references(recipe: Recipe, evals: Any) -> dict[str, Any]:
    """The evaluation rows' count and majority-class rate (accuracy comparisons only): the table's reference row."""
    majority = majority_of(evals, recipe) if metric_name(recipe) == "accuracy" else None
    return {"eval_rows": len(evals), "majority": majority}


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _save(
    out: Path, state: dict, methods: list[str], rows: list[int], seeds: list[int], recipe: Recipe, final: bool = False
) -> CompareResult:
    state.update(
        compare_version=COMPARE_VERSION,
        task=recipe.model.task,
        model=recipe.model.name,
        metric=metric_name(recipe),
        higher_is_better=metric_name(recipe) != "loss",
        methods=methods,
        rows=rows,
        seeds=seeds,
        versions=state.get("versions") or compare_cells.versions(),
    )
    cells = [c for c in state["cells"] if c["method"] in methods and (c["n"] in rows or c["method"] == "zero-shot")]
    majority, n_eval = state.get("majority"), state.get("eval_rows", 0)
    state["recommendation"] = recommendation(cells, methods, rows, state["higher_is_better"], majority, n_eval)
    write_atomic(out / COMPARE_MARKER, json.dumps(state, indent=2, default=float) + "\n")
    result = CompareResult(out=out, cells=cells, recommendation=state["recommendation"])
    if final:
        result.table = table(cells, methods, rows, state["metric"], majority)
        plot(
            cells,
            methods,
            rows,
            state["metric"],
            out / "compare.png",
            title=f"{recipe.model.name} ({recipe.model.task})",
            majority=majority,
        )
    return result
