"""The input side of ``ia3 predict``: rows read from ``.jsonl``/``.json``/``.csv``/``.parquet`` files, and each
valid row turned into a :class:`Job` for its adapter's recipe (bad rows are reported with the reason)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia3cli.errors import DataError

OUTPUT_FIELDS = ("prediction", "probabilities")


@dataclass
class Job:
    """One valid row: what to run and with which adapter."""

    index: int  # position among the valid rows' input order
    row: dict[str, Any]
    adapter: str
    kind: str  # "classify", "choose" or "generate"
    text: str | None = None
    pair: str | None = None
    messages: list[dict] | None = None
    choices: list[str] | None = None
    result: dict[str, Any] = field(default_factory=dict)


def iter_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """Each row of ``path`` as ``(where, row, problem)``, read as it goes: ``where`` is ``line N`` (``row N`` for
    parquet and JSON arrays).

    Raises:
        DataError: when the file is missing, of an unknown format, or unreadable as a whole.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "input file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
            items = json.loads(path.read_text(encoding="utf-8"))
            for n, row in enumerate(items, 1):
                problem = None if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
                yield f"row {n}", row if problem is None else None, problem
        elif suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        yield f"line {n}", None, f"not valid JSON ({exc.msg})"
                        continue
                    problem = None if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
                    yield f"line {n}", row if problem is None else None, problem
        elif suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                for row in reader:
                    short = [k for k, v in row.items() if v is None]
                    problem = f"too few fields (no {', '.join(map(str, short))})" if short else None
                    if None in row:
                        problem = "more fields than the header names"
                    yield f"line {reader.line_num}", None if problem else dict(row), problem
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            n = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    n += 1
                    yield f"row {n}", row, None
        else:
            raise DataError(str(path), None, f"unknown input format '{suffix}'", "use .jsonl, .json, .csv or .parquet")
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise DataError(str(path), None, f"cannot read: {exc}") from None
    except DataError:
        raise
    except Exception as exc:  # pyarrow's errors for a corrupt parquet file
        raise DataError(str(path), None, f"cannot read: {type(exc).__name__}: {exc}") from None


def read_rows(path: Path) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """Every row of ``path`` (:func:`iter_rows` as a list)."""
    return list(iter_rows(path))


def _choices(value: Any) -> list[str] | None:
    """A row's choices (:func:`~ia3cli.data.encoding.as_choices`); a CSV cell holds them as a JSON list."""
    from ia3cli.data.encoding import as_choices

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return as_choices(value)


def make_job(index: int, row: dict[str, Any], adapter: str, recipe: Any, choices_column: str | None = None) -> Job:
    """The job of a valid row for its adapter's recipe.

    Raises:
        ValueError: with the reason the row cannot be predicted.
    """
    from ia3cli.data.encoding import prompt_text

    d, task = recipe.data, recipe.model.task
    clash = [c for c in OUTPUT_FIELDS if c in row]
    if clash:
        raise ValueError(f"already has a '{clash[0]}' column (an ia3 predict output?); rename or drop it")
    if task != "seq-cls" and d.messages_column and d.messages_column in row:
        messages = row[d.messages_column]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"column '{d.messages_column}' must be a list of {{role, content}}")
        return Job(index, row, adapter, "generate", messages=messages)
    try:
        text = prompt_text(row, d)
    except KeyError as exc:
        used = "data.prompt_template" if d.prompt_template else "data.text_column"
        raise ValueError(f"missing column {exc} (used by {used} of adapter '{adapter}')") from None
    except (IndexError, ValueError) as exc:
        raise ValueError(f"cannot fill data.prompt_template of adapter '{adapter}': {exc}") from None
    if row.get(d.text_column) is None and not d.prompt_template:
        raise ValueError(f"column '{d.text_column}' is empty")
    if row.get(d.text_column) is not None and not isinstance(row[d.text_column], str):
        raise ValueError(f"column '{d.text_column}' must be a string, got {type(row[d.text_column]).__name__}")
    if task == "seq-cls":
        pair = None
        if d.text_pair_column:
            if row.get(d.text_pair_column) is None:
                raise ValueError(f"missing column '{d.text_pair_column}' (data.text_pair_column of '{adapter}')")
            if not isinstance(row[d.text_pair_column], str):
                raise ValueError(f"column '{d.text_pair_column}' must be a string")
            pair = row[d.text_pair_column]
        return Job(index, row, adapter, "classify", text=text, pair=pair)
    column = choices_column or d.choices_column or "choices"
    if row.get(column) is not None:
        choices = _choices(row[column])
        if choices is None:
            raise ValueError(f"column '{column}' must be a list of at least two non-blank strings")
        return Job(index, row, adapter, "choose", text=text, choices=choices)
    if d.choices_column:
        raise ValueError(f"missing column '{column}' (the choices of adapter '{adapter}', data.choices_column)")
    if recipe.has_choices:
        return Job(index, row, adapter, "choose", text=text, choices=list(d.label_names))
    return Job(index, row, adapter, "generate", text=text)


def output_line(job: Job) -> str:
    """The output line of a predicted job: every input column, then ``prediction`` (and ``probabilities``)."""
    return json.dumps({**job.row, **job.result}, ensure_ascii=False, default=str)
