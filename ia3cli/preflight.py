"""Pre-flight checks shared by ``ia3 validate`` and ``ia3 train``: everything that needs no model weights."""

from __future__ import annotations

from dataclasses import dataclass

from ia3cli.recipe import Recipe


@dataclass
class Preflight:
    """What the checks resolved: the IA3 target plan and the data report."""

    plan: object  # ia3cli.targets.TargetPlan
    data: object  # ia3cli.data.DataReport


def run(recipe: Recipe) -> Preflight:
    """Resolve the adapter targets on a meta-device model (config only) and check every data row.

    Raises:
        RecipeError, DataError: naming the key, file or row at fault.
    """
    from ia3cli import data, targets

    plan = targets.resolve(recipe.model, recipe.adapter, recipe.model.task, recipe.num_labels)
    report = data.check(recipe)
    return Preflight(plan=plan, data=report)
