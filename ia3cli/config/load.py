"""Reading a recipe: YAML file, ``--set`` overrides, validation against the schema, and the resolved dump.

``--set section.key=value`` overrides are parsed as YAML scalars and applied before validation; every problem is
reported at once, naming its dotted key. No torch here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ia3cli.config.paths import resolve_inputs
from ia3cli.config.recipe import SECTIONS, Recipe
from ia3cli.config.wording import format_errors, suggest
from ia3cli.errors import RecipeError


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into the key path and the YAML-typed value.

    Raises:
        RecipeError: when the item has no ``=`` or no dotted key.
    """
    if "=" not in item:
        raise RecipeError(None, f"--set '{item}' is not key=value", "e.g. --set training.learning_rate=1e-3")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) != 2:
        raise RecipeError(key, "--set keys are section.key", "e.g. --set model.quantization=4bit")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw recipe mapping (in place) and return it."""
    for item in overrides:
        (section, key), value = parse_override(item)
        if section not in SECTIONS:
            hint = suggest(section, list(SECTIONS))
            raise RecipeError(
                f"{section}.{key}", f"unknown section '{section}'", hint or f"sections: {', '.join(SECTIONS)}"
            )
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise RecipeError(section, "must be a mapping")
        target[key] = value
    return raw


def _fix_float_strings(raw: dict[str, Any]) -> None:
    # yaml.safe_load (YAML 1.1) reads `3e-3` as a string; convert such values where a float is expected.
    for section_name, section in SECTIONS.items():
        values = raw.get(section_name)
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            field = section.model_fields.get(key)
            if field is not None and isinstance(value, str) and "float" in str(field.annotation):
                with contextlib.suppress(ValueError):  # not a number: the schema reports it
                    values[key] = float(value)


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe.

    Relative input paths (``model.name``, ``data.path``, ``adapter.init_from``) are found in the working directory,
    else beside the recipe (:func:`ia3cli.config.paths.resolve_inputs`); ``output_dir`` is relative to the working
    directory.

    Args:
        path: YAML file.
        overrides: ``section.key=value`` strings from ``--set``.

    Raises:
        RecipeError: for a missing or unreadable file, bad YAML, or any schema problem (all listed at once).
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(None, f"recipe file not found: {p}", "check the path; shipped recipes are in recipes/")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(None, f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(None, f"{p}: cannot read: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(None, f"{p}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for section in raw:
        if section in SECTIONS and raw[section] is None:
            raw[section] = {}
    apply_overrides(raw, overrides or [])
    _fix_float_strings(raw)
    resolve_inputs(raw, p.parent)
    recipe = validate_mapping(raw)
    recipe._source = p.resolve()
    return recipe


def validate_mapping(raw: dict[str, Any]) -> Recipe:
    """Validate a raw mapping into a :class:`Recipe`.

    Raises:
        RecipeError: listing every problem.
    """
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise format_errors(exc, Recipe, SECTIONS) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every key, defaults included)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
