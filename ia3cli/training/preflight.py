"""Pre-flight checks shared by ``ia3 validate`` and ``ia3 train``: everything that needs no model weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ia3cli.config.recipe import Recipe
from ia3cli.errors import RecipeError
from ia3cli.training import distributed
from ia3cli.training.budget import budget_warning


@dataclass
class Preflight:
    """What the checks resolved: the IA3 target plan, the data report and warnings for the user."""

    plan: object  # ia3cli.models.targets.TargetPlan
    data: object  # ia3cli.data.checks.DataReport
    warnings: list[str] = field(default_factory=list)
    memory: str = ""  # the estimated memory per rank (ia3cli.training.distributed.memory_lines)
    memory_warnings: list[str] = field(default_factory=list)


def _as_set(targets: object) -> object:
    return frozenset(targets) if isinstance(targets, (list, tuple, set, frozenset)) else targets


def check_init_from(recipe: Recipe, plan: object) -> None:
    """``adapter.init_from`` names a finished run of the same base model, task and IA3 targets.

    Raises:
        RecipeError: when it is not a run dir with an adapter, or was trained on another base model or task, or
            with other target / feed-forward modules than ``plan`` resolves.
    """
    run = recipe.adapter.init_from
    if run is None:
        return
    folder = Path(run)
    saved = folder / "recipe.yaml"
    if not (folder / "adapter_model.safetensors").is_file() or not saved.is_file():
        raise RecipeError(
            "adapter.init_from", f"{run} is not a finished ia3cli run (no adapter_model.safetensors / recipe.yaml)"
        )
    try:
        model = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("model") or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError("adapter.init_from", f"{saved}: cannot read: {exc}") from None
    m = recipe.model
    for key, mine in (("name", m.name), ("gguf_file", m.gguf_file), ("revision", m.revision), ("task", m.task)):
        if model.get(key) != mine:
            raise RecipeError(
                "adapter.init_from",
                f"{run} was trained with model.{key} {model.get(key)!r}, this recipe has {mine!r}",
                "IA3 vectors only transfer between runs of the same base model and task",
            )
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the vectors themselves are checked against the model when they are loaded
    for key in ("target_modules", "feedforward_modules"):
        theirs, ours = _as_set(config.get(key)), _as_set(getattr(plan, key))
        if theirs != ours:
            raise RecipeError(
                "adapter.init_from",
                f"the IA3 vectors in {run} target other modules than this recipe ({key} {config.get(key)} there, "
                f"{getattr(plan, key)} here)",
                f"use the same adapter.{key} as that run",
            )


def run(recipe: Recipe) -> Preflight:
    """Resolve the adapter targets on a meta-device model (config only), check every data row, the step budget
    and ``adapter.init_from``.

    Raises:
        RecipeError, DataError: naming the key, file or row at fault.
    """
    from ia3cli.data import checks
    from ia3cli.models import targets

    distributed.check_launcher(recipe)
    plan = targets.resolve(recipe.model, recipe.adapter, recipe.model.task, recipe.num_labels)
    check_init_from(recipe, plan)
    report = checks.check(recipe)
    warnings = [w for w in [budget_warning(recipe.training, len(report.train))] if w]
    memory, memory_warnings = distributed.memory_lines(recipe, plan.ia3_params)
    return Preflight(plan=plan, data=report, warnings=warnings, memory=memory, memory_warnings=memory_warnings)
