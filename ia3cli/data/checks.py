"""Pre-flight data checks (part of ``ia3 validate``): load the splits, confirm the named columns exist, and report
the first bad row by file and number, before any model weights are loaded."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ia3cli.config.recipe import DataSection, Recipe
from ia3cli.data.encoding import as_choices, choice_label, label_id
from ia3cli.data.sources import load_splits
from ia3cli.errors import DataError, RecipeError

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class DataReport:
    """What ``check`` found: split sizes and columns, and the checked splits themselves (reused by ``build``)."""

    source: str
    splits: dict[str, int] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    label_counts: dict[str, int] = field(default_factory=dict)
    train: Any = field(default=None, repr=False)
    eval: Any = field(default=None, repr=False)


def _template_fields(template: str, key: str = "data.prompt_template") -> list[str]:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RecipeError(key, f"is not a valid format string: {exc}") from None
    for _, name, _, conversion in parts:
        if conversion not in (None, "r", "s", "a"):
            raise RecipeError(
                key,
                f"is not a valid format string: unknown conversion '!{conversion}' after {{{name}}}",
                "use {column}, {column!r} or {column!s}",
            )
    return [name for _, name, _, _ in parts if name]


def _needs_label(recipe: Recipe) -> bool:
    d = recipe.data
    return recipe.model.task == "seq-cls" or (d.target_column is None and d.messages_column is None)


def required_columns(recipe: Recipe) -> list[str]:
    """Columns every row must have for this recipe."""
    d = recipe.data
    if d.messages_column:
        return [d.messages_column]
    templates = [t for t in [d.prompt_template, *(d.prompt_templates or [])] if t]
    cols = [f for t in templates for f in _template_fields(t)] if templates else [d.text_column]
    if d.choices_column:
        cols.append(d.choices_column)
    if recipe.model.task == "seq-cls" and d.text_pair_column:
        cols.append(d.text_pair_column)
    if _needs_label(recipe):
        cols.append(d.label_column)
    elif d.target_column:
        cols.append(d.target_column)
    return list(dict.fromkeys(cols))


def check_rows(ds: Dataset, recipe: Recipe, source: str) -> dict[str, int]:
    """Check every row of a split; returns label counts.

    Raises:
        DataError: naming the first bad row (1-based) and column.
    """
    d = recipe.data
    cols = required_columns(recipe)
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        key = next(
            (
                k
                for k, templates in (
                    ("data.prompt_template", [d.prompt_template]),
                    ("data.prompt_templates", d.prompt_templates),
                )
                if any(t and missing[0] in _template_fields(t) for t in templates or [])
            ),
            None,
        )
        hint = f"columns present: {', '.join(ds.column_names)}" + (f" (used by {key})" if key else "")
        raise DataError(source, None, f"missing column '{missing[0]}'", hint)
    counts: dict[str, int] = {}
    n_labels = recipe.num_labels
    for i, row in enumerate(ds, 1):
        if d.messages_column:
            _check_messages(row[d.messages_column], source, i)
            continue
        if d.choices_column:
            _check_choices(row, d, source, i)
        for c in cols:
            v = row[c]
            if c == d.choices_column:
                continue
            if c == d.label_column and _needs_label(recipe) and d.choices_column:
                counts[str(choice_label(row, d))] = counts.get(str(choice_label(row, d)), 0) + 1
            elif c == d.label_column and _needs_label(recipe):
                lid = label_id(v, d, n_labels)
                if lid is None:
                    names = f" or one of {d.label_names}" if d.label_names else ""
                    raise DataError(
                        source,
                        i,
                        f"label {v!r} in column '{c}' is not a class id 0..{n_labels - 1}{names}",
                        "fix the row, or set model.num_labels / data.label_names",
                    )
                counts[str(lid)] = counts.get(str(lid), 0) + 1
            elif v is None or (isinstance(v, str) and not v.strip()):
                raise DataError(source, i, f"column '{c}' is empty", "fill it in or drop the row")
    return counts


def _check_choices(row: dict[str, Any], data: DataSection, source: str, i: int) -> None:
    value = row[data.choices_column]
    if as_choices(value) is None:
        raise DataError(
            source,
            i,
            f"column '{data.choices_column}' must be a list of at least 2 non-empty strings",
            f"got {value!r}",
        )
    if choice_label(row, data) is None:
        raise DataError(
            source,
            i,
            f"label {row[data.label_column]!r} is neither an index 0..{len(value) - 1} into "
            f"'{data.choices_column}' nor one of its strings",
            "fix the row",
        )


def _check_messages(messages: Any, source: str, row: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(source, row, "messages must be a non-empty list of {role, content}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(source, row, "each message needs 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(source, row, "no assistant message to learn from")


def check(recipe: Recipe) -> DataReport:
    """Pre-flight: load the splits and check every row (no model weights needed).

    Raises:
        DataError, RecipeError: naming the file, row or key at fault.
    """
    d = recipe.data
    if d.prompt_template:
        _template_fields(d.prompt_template)
    for template in d.prompt_templates or []:
        _template_fields(template, "data.prompt_templates")
    train, evals = load_splits(recipe)
    report = DataReport(source=d.path, train=train, eval=evals)
    for split, ds in ((d.train_split, train), (d.eval_split, evals)):
        if ds is None:
            continue
        if len(ds) == 0:
            raise DataError(f"{d.path} [{split}]", None, "split is empty")
        counts = check_rows(ds, recipe, f"{d.path} [{split}]")
        report.splits[split] = len(ds)
        for k, v in counts.items():
            report.label_counts[k] = report.label_counts.get(k, 0) + v
    report.columns = list(train.column_names)
    return report
