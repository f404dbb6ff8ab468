"""``ia3 eval TARGET``: what TARGET is (a run dir, a merged model dir, or a base model with ``--recipe``), loading
it, evaluating one split with :func:`ia3cli.scoring.evaluation.evaluate`, and keeping the result in TARGET under a
name that says what was evaluated (:func:`result_path`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ia3cli.config.paths import looks_local
from ia3cli.config.recipe import Recipe
from ia3cli.errors import Ia3Error, RecipeError, RunError
from ia3cli.models.device import resolve as resolve_device
from ia3cli.scoring.evaluation import Progress, evaluate


def _target_kind(target: str) -> str:
    """``run``, ``merged`` or ``base``.

    Raises:
        Ia3Error: when a path-like target does not exist or a folder holds neither an adapter nor a model.
    """
    path = Path(target).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "run"
        if (path / "merge_report.json").is_file():
            return "merged"
        if (path / "config.json").is_file() and (path / "recipe.yaml").is_file():
            return "merged"
        if (path / "config.json").is_file() or any(path.glob("*.gguf")):
            return "base"
        raise Ia3Error(
            f"{target}: neither a run dir (adapter_config.json) nor a model dir (config.json)",
            "pass the output_dir of `ia3 train`, the OUT of `ia3 merge`, or a base model with --recipe",
        )
    if path.exists() or looks_local(target):
        raise Ia3Error(
            f"{target}: target not found" if not path.exists() else f"{target}: not a directory",
            "pass a run dir from `ia3 train`, a merged dir from `ia3 merge`, or a base model (hub id, folder, "
            "pkg:PACKAGE/DIR) with --recipe",
        )
    return "base"


def _load_recipe(kind: str, target: str, recipe_path: Path | None, overrides: list[str]) -> Recipe:
    from ia3cli.config.load import load_recipe

    saved = Path(target).expanduser() / "recipe.yaml"
    if recipe_path is None and kind in ("run", "merged") and saved.is_file():
        recipe_path = saved
    if recipe_path is None:
        what = {"run": "the run dir has no recipe.yaml", "merged": "the merged dir has no recipe.yaml"}
        raise RecipeError(
            "--recipe",
            f"no recipe for '{target}' ({what.get(kind, 'a base model needs one')})",
            "pass --recipe RECIPE.yaml: it says the task, data and prompt to evaluate with",
        )
    return load_recipe(recipe_path, overrides)


def _load_model(kind: str, target: str, recipe: Recipe, full_precision: bool, device: str = "auto") -> tuple[Any, Any]:
    from ia3cli.models import loading as modeling
    from ia3cli.tuners import ia3

    changes: dict[str, Any] = {"quantization": "none"} if full_precision else {}
    if kind == "merged":
        # A merged model is a full-precision checkpoint of its own; the base's quantization and GGUF do not apply.
        changes = {"name": str(Path(target).expanduser()), "quantization": "none", "gguf_file": None, "revision": None}
    elif kind == "base":
        changes["name"] = target
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update=changes)})
    if kind == "run":
        return ia3.load_run_model(target, recipe, device=device)
    tokenizer = modeling.load_tokenizer(recipe.model)
    return modeling.load_recipe_base(recipe, tokenizer, device), tokenizer


def run_eval(
    target: str,
    *,
    recipe_path: Path | None,
    data: str | None,
    split: str | None,
    overrides: list[str],
    full_precision: bool,
    progress: Progress | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate a run dir, a merged model dir or a base model on one split; see the module docstring.

    Args:
        target: Run dir (adapter + recipe.yaml), merged dir (from ``ia3 merge``), or base model (needs a recipe).
        recipe_path: Recipe to use instead of the one saved in TARGET.
        data: Replaces ``data.path``.
        split: Replaces ``data.eval_split`` (default: the recipe's eval split). ``data.eval_samples`` applies.
        overrides: ``section.key=value`` strings applied to the recipe.
        full_precision: Load the base unquantised even when the recipe says 4/8-bit.
        progress: Called as batches finish (see :data:`Progress`).
        device: ``--device`` (see :mod:`ia3cli.models.device`).

    Returns:
        The metrics: ``target``, ``split``, ``rows``, the task's metrics and, for classification and choice tasks,
        ``majority_accuracy`` (always answering the rows' most frequent label). Also written into TARGET when it is
        a run or merged dir, named by what was evaluated (:func:`result_path`).

    Raises:
        Ia3Error: TARGET not found or not a model; RecipeError: no recipe, no split; DataError: bad data.
    """
    from ia3cli.data.checks import check_rows
    from ia3cli.data.sources import load_split, sample
    from ia3cli.outputs import read_json_object, write_atomic
    from ia3cli.scoring.chance import majority_of

    resolve_device(device)  # a device that is not there fails before anything is read
    kind = _target_kind(target)
    recipe = _load_recipe(kind, target, recipe_path, overrides)
    if data is not None:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"path": data})})
    split = split or recipe.data.eval_split
    if split is None:
        raise RecipeError("data.eval_split", "is null: nothing to evaluate on", "pass --split (e.g. --split train)")
    ds = sample(load_split(recipe.data, split), recipe.data.eval_samples, recipe.training.seed)
    if len(ds) == 0:
        raise RecipeError("--split", f"split '{split}' of {recipe.data.path} is empty")
    check_rows(ds, recipe, f"{recipe.data.path} [{split}]")

    model, tokenizer = _load_model(kind, target, recipe, full_precision, device)
    metrics: dict[str, Any] = {"target": target, "kind": kind, "task": recipe.model.task, "data": recipe.data.path}
    metrics.update({"split": split, "rows": len(ds)})
    metrics.update(evaluate(model, tokenizer, recipe, list(ds), progress))
    majority = majority_of(ds, recipe)
    if majority is not None:  # what always answering the most frequent label of these rows scores
        metrics["majority_accuracy"] = majority
    if kind in ("run", "merged"):
        evaluated = {"data": data, "split": split, "recipe": str(recipe_path) if recipe_path else None}
        evaluated |= {"overrides": list(overrides), "full_precision": full_precision}
        dest = result_path(Path(target).expanduser(), evaluated)
        metrics["evaluated"] = evaluated
        if dest.exists() and read_json_object(dest).get("evaluated") != evaluated:
            raise Ia3Error(f"{dest}: exists and is not this evaluation's result", "move it away; nothing was written")
        try:
            write_atomic(dest, json.dumps(metrics, indent=2) + "\n")
        except OSError as exc:
            raise RunError(f"{dest}: cannot write: {exc.strerror or exc}") from None
    return metrics


def result_path(folder: Path, evaluated: dict[str, Any]) -> Path:
    """Where ``ia3 eval`` keeps a result in a run or merged dir: ``eval-<split>.json`` for the run's own data and
    recipe, ``eval-<split>-<digest>.json`` when ``--data``, ``--recipe``, ``--set`` or ``--full-precision`` changed
    what was evaluated (the digest of those), so that one evaluation never replaces another's result."""
    name = f"eval-{evaluated['split'].replace('/', '_')}"
    changed = {k: v for k, v in evaluated.items() if k != "split" and v}
    if changed:
        name += "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
    return folder / f"{name}.json"


def render(metrics: dict[str, Any]) -> str:
    """The metrics as a small aligned table for the terminal."""
    shown = {k: v for k, v in metrics.items() if k not in ("kind", "evaluated")}
    width = max((len(k) for k in shown), default=0)
    lines = []
    for key, value in shown.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key.ljust(width)}  {text}")
    return "\n".join(lines)
