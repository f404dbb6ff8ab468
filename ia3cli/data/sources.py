"""Loading one split: local .jsonl/.json/.csv/.parquet files or folders, or a hub dataset.

Only the loader's own failures become :class:`ia3cli.errors.DataError` (a missing file, an unknown split, a line
that does not parse, named by file and line); anything else (a bug, ``MemoryError``) propagates unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ia3cli.config.paths import looks_local
from ia3cli.config.recipe import DataSection, Recipe
from ia3cli.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _local_format(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in LOCAL_FORMATS)
    if not files:
        raise DataError(str(path), None, "no .jsonl/.json/.csv/.parquet files in this folder")
    formats = {LOCAL_FORMATS.get(p.suffix) for p in files}
    if None in formats:
        raise DataError(
            str(path), None, f"unsupported file type '{path.suffix}'", "use .jsonl, .json, .csv or .parquet"
        )
    if len(formats) > 1:
        raise DataError(str(path), None, "mixes file types; keep one format per folder")
    for file in files:  # the datasets readers stumble over empty files (StopIteration from the JSON reader)
        if file.stat().st_size == 0:
            raise DataError(str(file), None, "file is empty", "add rows or remove the file")
    return formats.pop()


def _find_bad_json_line(path: Path) -> tuple[Path, int, str] | None:
    """The first malformed line of the .jsonl files at ``path``: (file, 1-based line, what is wrong)."""
    files = [path] if path.is_file() else sorted(path.glob("*.jsonl"))
    for file in files:
        if file.suffix != ".jsonl":
            continue
        with file.open(encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    return file, i, f"not valid JSON ({exc.msg})"
                if not isinstance(obj, dict):
                    return file, i, "not a JSON object"
    return None


def _parse_errors() -> tuple[type[BaseException], ...]:
    """What ``datasets`` raises for a malformed file: its JSON reader a bare ``ValueError``, pandas' CSV reader a
    ``ParserError`` (a ``ValueError``), pyarrow ``ArrowInvalid``/``ArrowTypeError``, undecodable text a
    ``UnicodeDecodeError`` (a ``ValueError``)."""
    import pyarrow

    return (ValueError, pyarrow.ArrowInvalid, pyarrow.ArrowTypeError)


# Unreachable or missing sources: a wrong hub id, offline, a file that vanished or cannot be read.
_SOURCE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, ConnectionError, TimeoutError)


def load_split(data: DataSection, split: str) -> Dataset:
    """Load one split (a ``datasets`` split expression such as ``train`` or ``train[:80%]``).

    Only the loader's own errors become :class:`DataError`; anything else (out of memory, a bug) propagates.

    Raises:
        DataError: missing file, malformed rows (naming the first bad JSON line), unknown split, unreachable hub
            dataset.
    """
    import datasets

    datasets.disable_progress_bars()
    path = Path(data.path)
    is_local = looks_local(data.path) or Path(data.path).suffix in LOCAL_FORMATS
    if is_local and not path.exists():
        raise DataError(
            data.path,
            None,
            "file or folder not found",
            "check data.path (found in the working directory, else beside the recipe)",
        )
    parse_errors = _parse_errors()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # parse errors are reported below, by row
    try:
        if is_local:
            fmt = _local_format(path)
            if path.is_file():
                return datasets.load_dataset(fmt, data_files={"train": str(path)}, split=split)
            return datasets.load_dataset(str(path), split=split)
        return datasets.load_dataset(data.path, data.name, split=split)
    except datasets.exceptions.DatasetGenerationError as exc:  # wraps the reader's error
        cause = exc.__cause__ or exc.__context__
        if not isinstance(cause, parse_errors):
            raise
        raise _malformed(data, path if is_local else None, cause) from None
    except parse_errors as exc:
        msg = str(exc)
        if msg.startswith("Unknown split"):
            available = _available_splits(data)
            raise DataError(
                data.path, None, f"has no split '{split}'", f"available splits: {', '.join(available) or '?'}"
            ) from None
        if "corresponds to no data" in msg:
            raise DataError(
                f"{data.path} [{split}]", None, "split is empty", "add rows or choose another split"
            ) from None
        if msg.startswith(("Unrecognized instruction format", "Bad split")):
            raise DataError(
                data.path, None, f"'{split}' is not a split expression", "e.g. train, validation or train[:80%]"
            ) from None
        raise _malformed(data, path if is_local else None, exc) from None
    except (datasets.exceptions.DatasetNotFoundError, *_SOURCE_ERRORS) as exc:
        hint = "check the dataset id; offline? use a local file" if not is_local else None
        raise DataError(data.path, None, f"cannot load: {_first_line(exc)}", hint) from None
    finally:
        datasets.logging.set_verbosity(level)


def _malformed(data: DataSection, local: Path | None, exc: BaseException) -> DataError:
    """The error for a file the reader could not parse: the first bad JSON line when there is one."""
    bad = _find_bad_json_line(local) if local is not None else None
    if bad:
        return DataError(str(bad[0]), bad[1], bad[2], "fix or remove that line")
    return DataError(data.path, None, f"cannot parse: {_first_line(exc)}", "check the file's format")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _available_splits(data: DataSection) -> list[str]:
    """The split names of ``data`` for a hint (empty when they cannot be listed)."""
    import datasets

    try:
        path = Path(data.path)
        if path.exists():
            if path.is_file():
                return ["train"]
            return list(datasets.load_dataset(str(path)).keys())
        return list(datasets.get_dataset_split_names(data.path, data.name))
    except (datasets.exceptions.DatasetsError, *_parse_errors(), *_SOURCE_ERRORS):
        return []


def sample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """``n`` rows drawn with ``seed`` (all rows when ``n`` is None); training and ``ia3 eval`` draw the same ones."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def load_splits(recipe: Recipe) -> tuple[Dataset, Dataset | None]:
    """Train and eval splits, subsampled to ``train_samples``/``eval_samples`` with the recipe's seed."""
    d, seed = recipe.data, recipe.training.seed
    train = sample(load_split(d, d.train_split), d.train_samples, seed)
    evals = sample(load_split(d, d.eval_split), d.eval_samples, seed) if d.eval_split else None
    return train, evals
