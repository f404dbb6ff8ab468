"""``ia3 predict``: offline batch inference over a file, many IA3 adapters on one base, mixed in every batch.

1. Adapters: a run dir (one adapter, named by its folder), or a folder of run dirs (each subfolder with
   ``adapter_config.json`` is an adapter named by its folder), plus ``--adapter NAME=RUN_DIR``. The first adapter
   (the run dir, the folder's first subfolder by name, else the first ``--adapter``) decides the base; every other
   one must share its base model, task and targets (:class:`ia3cli.tuners.mixed.MixedIA3`).
2. Rows (``.jsonl``, ``.json`` lines or array, ``.csv``, ``.parquet``) name their adapter in ``--adapter-column``
   (default ``adapter``). A row without it (or with an empty value) uses the only adapter when there is one;
   with several it is a bad row.
3. Each row becomes one job, with the recipe of its adapter (``data.prompt_template``, ``text_column``, ...):
   - ``seq-cls``: the head's softmax -> ``prediction`` (the label name) and ``probabilities`` per label;
   - ``causal-lm``/``seq2seq`` with choices (a row's ``choices`` list, else the recipe's ``label_names``): rank
     classification, each choice scored by the mean log-probability of its tokens as ``ia3 eval`` does;
     ``prediction`` is the best choice and ``probabilities`` the softmax over the scores;
   - otherwise generation from the prompt (chat ``messages`` through the chat template): ``prediction`` is the
     text, greedy unless ``--temperature`` > 0 (then sampled with ``--top-p``, seeded by ``--seed``).
4. Bad rows (unreadable line, unknown adapter, missing column, a ``prediction`` column already there) are found
   before any weights load and reported by line. ``--on-error fail`` (the default: no row is ever dropped
   silently) stops with the list and writes nothing; ``--on-error skip`` leaves them out of the output, prints
   each and records them in the sidecar.
5. Jobs are sorted by length and batched (adapters mixed within a batch); the output keeps input order and every
   input column. It is JSON lines, written atomically with a sidecar ``OUTPUT.predict.json`` (adapters, counts,
   errors) that marks it as an ``ia3 predict`` output: an existing OUTPUT is only replaced when its sidecar exists.

``--ray`` runs the same steps on a Ray cluster (:mod:`ia3cli.inference.ray_predict`); rows are read and turned into
jobs by :mod:`ia3cli.inference.rows` in both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ia3cli import __version__
from ia3cli.errors import DataError, Ia3Error
from ia3cli.inference.rows import Job, iter_rows, make_job, output_line
from ia3cli.models.device import input_device
from ia3cli.models.device import resolve as resolve_device
from ia3cli.outputs import write_atomic

SIDECAR_SUFFIX = ".predict.json"
ON_ERROR = ("fail", "skip")
SHOWN_ERRORS = 10


@dataclass
class PredictResult:
    """What ``predict`` did: where it wrote, how many rows it predicted, which rows it skipped and why."""

    output: Path
    rows: int
    predicted: int
    errors: list[dict[str, Any]]
    adapters: list[str]


# --- adapters ------------------------------------------------------------------------------------------------------


def resolve_adapters(source: Path | None, extra: Sequence[str] = ()) -> dict[str, Path]:
    """Adapter names -> run dirs, the first being the one whose base is loaded.

    Args:
        source: A run dir, a folder of run dirs, or ``None`` (then ``extra`` must name one).
        extra: ``NAME=RUN_DIR`` strings from ``--adapter``.

    Raises:
        Ia3Error: for a missing path, a folder without run dirs, a malformed or duplicate ``--adapter``.
    """
    adapters: dict[str, Path] = {}
    if source is not None:
        source = Path(source)
        if not source.is_dir():
            raise Ia3Error(f"{source}: not found (expected a run dir or a folder of run dirs)")
        if (source / "adapter_config.json").is_file():
            adapters[source.resolve().name] = source
        else:
            subs = sorted(p for p in source.iterdir() if (p / "adapter_config.json").is_file())
            if not subs:
                raise Ia3Error(
                    f"{source}: neither a run dir nor a folder of run dirs (no adapter_config.json in it or its "
                    "subfolders)",
                    "pass the output_dir of `ia3 train`, or a folder holding several",
                )
            adapters.update((p.name, p) for p in subs)
    for spec in extra:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise Ia3Error(f"--adapter {spec!r}: expected NAME=RUN_DIR", "e.g. --adapter support=runs/support")
        if name.strip() in adapters:
            raise Ia3Error(f"--adapter {spec!r}: the name '{name.strip()}' is already taken", "choose another NAME")
        adapters[name.strip()] = Path(path.strip())
    if not adapters:
        raise Ia3Error("no adapter given", "pass a run dir, a folder of run dirs, or --adapter NAME=RUN_DIR")
    return adapters


# --- output --------------------------------------------------------------------------------------------------------


def sidecar(output: Path) -> Path:
    """The file that records a predict output (and marks it as one)."""
    return output.with_name(output.name + SIDECAR_SUFFIX)


def default_output(input_path: Path) -> Path:
    """``rows.jsonl`` -> ``rows.predictions.jsonl`` beside it."""
    return input_path.with_name(input_path.stem + ".predictions.jsonl")


def check_output(output: Path, input_path: Path) -> None:
    """Refuse an output that is the input, a folder, or a file ``ia3 predict`` did not write.

    Raises:
        Ia3Error: naming the output; nothing has been touched.
    """
    if output.suffix.lower() != ".jsonl":
        raise Ia3Error(f"--output {output}: predictions are JSON lines", "name the output *.jsonl")
    if output.exists() and output.resolve() == Path(input_path).resolve():
        raise Ia3Error(f"--output {output}: is the input file", "choose another --output")
    if output.is_dir():
        raise Ia3Error(f"--output {output}: is a folder", "name a file, e.g. preds.jsonl")
    marker = sidecar(output)
    ours = False
    if marker.is_file():
        try:
            ours = json.loads(marker.read_text(encoding="utf-8")).get("written_by") == "ia3 predict"
        except (OSError, ValueError, AttributeError):
            ours = False
    if marker.exists() and not ours:
        raise Ia3Error(f"--output {output}: {marker} exists and was not written by ia3 predict", "choose another")
    if output.exists() and not ours:
        raise Ia3Error(
            f"--output {output}: exists and is not an ia3 predict output (no {marker.name} beside it)",
            "choose another --output, or move the file away; nothing was written",
        )


def _write(output: Path, input_path: Path, jobs: list[Job], meta: dict[str, Any]) -> None:
    check_output(output, input_path)  # again: a file may have appeared there while the model ran
    lines = [output_line(job) for job in jobs]
    # the sidecar first: an output file never exists without the record that lets a later run replace it
    write_atomic(sidecar(output), json.dumps(meta, indent=2, default=str) + "\n")
    write_atomic(output, "".join(line + "\n" for line in lines))


# --- the run -------------------------------------------------------------------------------------------------------


def predict(
    source: Path | None,
    input_path: Path,
    output: Path | None = None,
    *,
    adapters: Sequence[str] = (),
    adapter_column: str = "adapter",
    choices_column: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_error: str = "fail",
    printer: Callable[[str], None] = print,
    device: str = "auto",
) -> PredictResult:
    """Predict every row of ``input_path`` with its adapter and write JSON lines (see the module docstring).

    Args:
        source: A run dir or a folder of run dirs (or ``None`` with ``adapters``).
        input_path: ``.jsonl``, ``.csv`` or ``.parquet`` rows.
        output: Where to write (default ``INPUT_STEM.predictions.jsonl`` beside the input).
        adapters: More adapters as ``NAME=RUN_DIR``.
        adapter_column: Column naming a row's adapter.
        choices_column: Column with a row's own choices (causal-lm/seq2seq rank classification); default: the
            adapter's ``data.choices_column``, else ``choices``.
        batch_size: Rows per forward (sequences, for choices).
        max_new_tokens: Generation length.
        temperature: 0 for greedy generation, else sampling at this temperature.
        top_p: Nucleus sampling threshold (with ``temperature`` > 0).
        seed: Seed for sampling.
        on_error: ``fail`` (stop on bad rows, write nothing) or ``skip`` (leave them out, report them).
        printer: Receives progress and error lines.
        device: Where the model runs (``--device``; see :mod:`ia3cli.models.device`).

    Raises:
        Ia3Error: bad arguments, adapters or output; DataError for bad rows with ``on_error="fail"``.
    """
    resolve_device(device)  # a device that is not there fails before anything is read
    settings = (batch_size, max_new_tokens, temperature, top_p)
    input_path, named, recipes, output = prepare(source, input_path, output, adapters, on_error, settings)
    jobs, errors = jobs_from_rows(iter_rows(input_path), named, recipes, adapter_column, choices_column)
    report_bad_rows(errors, on_error, input_path, output, printer)

    from ia3cli.inference import jobs as inference

    used = [n for n in named if any(j.adapter == n for j in jobs)]
    base, task = recipes[next(iter(named))].model.name, recipes[next(iter(named))].model.task
    if jobs:
        mixed = inference.load(named, used, device=device)
        base, task = mixed.base_name, mixed.task
        on = input_device(mixed.model)
        printer(f"predict: {len(jobs)} rows, adapters {', '.join(used)} on {base} ({task}), {on}")
        inference.run(
            mixed,
            jobs,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            printer=printer,
        )
    generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    meta = sidecar_meta(input_path, {n: named[n] for n in used}, base, task, len(jobs), errors, generation)
    _write(output, input_path, jobs, meta)
    return PredictResult(output, len(jobs) + len(errors), len(jobs), errors, used)


def prepare(
    source: Path | None,
    input_path: Path,
    output: Path | None,
    adapters: Sequence[str],
    on_error: str,
    settings: tuple[int, int, float, float],
) -> tuple[Path, dict[str, Path], dict[str, Any], Path]:
    """Check the arguments (``settings``: batch size, max new tokens, temperature, top-p), adapters and output.

    Returns:
        The input path, adapter names -> run dirs, their recipes, and the output path.

    Raises:
        Ia3Error: naming the bad argument, adapter or output; nothing has been read or written.
    """
    input_path = Path(input_path)
    batch_size, max_new_tokens, temperature, top_p = settings
    if on_error not in ON_ERROR:
        raise Ia3Error(f"--on-error: '{on_error}' is not a policy", "use fail or skip")
    if batch_size < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise Ia3Error(
            "--batch-size and --max-new-tokens must be >= 1, --temperature >= 0, --top-p in (0, 1]",
            f"got {batch_size}, {max_new_tokens}, {temperature}, {top_p}",
        )
    named = resolve_adapters(source, adapters)
    output = Path(output) if output is not None else default_output(input_path)
    check_output(output, input_path)
    return input_path, named, recipes_of(named), output


def sidecar_meta(
    input_path: Path,
    adapters: dict[str, Path],
    base: str,
    task: str,
    predicted: int,
    errors: list[dict[str, Any]],
    generation: dict[str, Any],
) -> dict[str, Any]:
    """What the sidecar ``OUTPUT.predict.json`` records (and what marks OUTPUT as an ``ia3 predict`` output)."""
    return {
        "written_by": "ia3 predict",
        "ia3cli": __version__,
        "input": str(input_path),
        "adapters": {n: str(p) for n, p in adapters.items()},
        "base_model": base,
        "task": task,
        "rows": predicted + len(errors),
        "predicted": predicted,
        "skipped": len(errors),
        "errors": errors,
        "generation": generation,
    }


def recipes_of(named: dict[str, Path]) -> dict[str, Any]:
    """Each adapter's recipe, from its run dir (checked to be a finished run)."""
    from ia3cli.config.load import load_recipe

    recipes = {}
    for name, run_dir in named.items():
        if not run_dir.is_dir():
            raise Ia3Error(f"adapter '{name}': run directory not found: {run_dir}")
        if not (run_dir / "recipe.yaml").is_file():
            raise Ia3Error(f"adapter '{name}': {run_dir} has no recipe.yaml (not a finished run dir)")
        recipes[name] = load_recipe(run_dir / "recipe.yaml")
    return recipes


def jobs_from_rows(
    rows: Iterable[tuple[str, dict[str, Any] | None, str | None]],
    named: dict[str, Path],
    recipes: dict[str, Any],
    adapter_column: str,
    choices_column: str | None,
    start: int = 0,
) -> tuple[list[Job], list[dict[str, Any]]]:
    """The jobs of the valid rows (numbered from ``start``) and ``{"where", "error"}`` for each bad one."""
    jobs: list[Job] = []
    errors: list[dict[str, Any]] = []
    for where, row, problem in rows:
        if row is not None:
            name = row.get(adapter_column)
            try:
                if name in (None, ""):
                    if len(named) > 1:
                        raise ValueError(f"no '{adapter_column}' column and {len(named)} adapters are loaded")
                    name = next(iter(named))
                if not isinstance(name, str) or name not in named:
                    raise ValueError(f"unknown adapter {name!r} (loaded: {', '.join(named)})")
                jobs.append(make_job(start + len(jobs), row, name, recipes[name], choices_column))
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            errors.append({"where": where, "error": problem})
    return jobs, errors


def report_bad_rows(
    errors: list[dict[str, Any]], on_error: str, input_path: Path, output: Path, printer: Callable[[str], None]
) -> None:
    """``fail``: raise with the first bad rows (nothing is written); ``skip``: print them."""
    if errors and on_error == "fail":
        shown = "\n  ".join(f"{e['where']}: {e['error']}" for e in errors[:SHOWN_ERRORS])
        more = f"\n  ... and {len(errors) - SHOWN_ERRORS} more" if len(errors) > SHOWN_ERRORS else ""
        raise DataError(
            str(input_path),
            None,
            f"{len(errors)} bad row(s), nothing was predicted:\n  {shown}{more}",
            "fix the rows, or pass --on-error skip to predict the others",
        )
    for e in errors[:SHOWN_ERRORS]:
        printer(f"skipped {input_path}, {e['where']}: {e['error']}")
    if len(errors) > SHOWN_ERRORS:
        printer(f"skipped {len(errors) - SHOWN_ERRORS} more bad rows (all listed in {sidecar(output)})")
