"""``ia3 predict --ray``: the same predictions on a Ray cluster, streamed through Ray Data.

1. The arguments, adapters and output are checked as ``ia3 predict`` checks them, and the driver reads the rows
   once, as they come, to find the bad ones (``--on-error fail`` stops there, before any weights load) and the
   adapters in use. Only the bad rows are kept.
2. Ray Data reads the file again through :class:`RowsSource` (the same reader, :func:`~rows.iter_rows`, so lines
   are numbered and refused the same way), in blocks, on the driver's node.
3. ``map_batches`` sends the blocks to a pool of ``--workers`` actors (:class:`Predictor`): each loads the base
   and the used adapters once, turns rows into jobs exactly as ``ia3 predict`` does and runs them through
   :func:`ia3cli.inference.jobs.run`, adapters mixed in every batch; it returns each row's output line.
4. The driver writes the lines in input order (Ray Data keeps it) into a temporary file beside the output, then
   writes the sidecar and renames the file into place: memory on the driver does not grow with the input.

Greedy generation, classification and rank classification give the rows ``ia3 predict`` gives (probabilities to
float rounding: batches are cut differently). Sampling (``--temperature`` > 0) is seeded per block, so it is
reproducible but differs from a single-process run.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ia3cli.errors import Ia3Error
from ia3cli.inference import predict as single
from ia3cli.inference.rows import iter_rows, output_line
from ia3cli.outputs import file_mode

BLOCK_ROWS = 1024  # rows per block Ray Data moves between the reader, the actors and the driver


class RowsSource:
    """A Ray Data datasource of one input file: blocks of ``where``, the pickled row (or null) and its problem."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()

    def blocks(self) -> Iterator[Any]:
        import pyarrow as pa

        batch: list[tuple[str, dict | None, str | None]] = []
        for item in iter_rows(self.path):
            batch.append(item)
            if len(batch) == BLOCK_ROWS:
                yield _block(pa, batch)
                batch = []
        if batch:
            yield _block(pa, batch)


def _block(pa: Any, batch: list[tuple[str, dict | None, str | None]]) -> Any:
    return pa.table(
        {
            "where": pa.array([w for w, _, _ in batch], pa.string()),
            "row": pa.array([None if r is None else pickle.dumps(r) for _, r, _ in batch], pa.binary()),
            "problem": pa.array([p for _, _, p in batch], pa.string()),
        }
    )


def datasource(path: Path) -> Any:
    """:class:`RowsSource` as a ``ray.data.Datasource`` (one read task, on the driver's node, where the file is)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    source = RowsSource(path)

    class _Source(Datasource):
        supports_distributed_reads = False

        def estimate_inmemory_data_size(self) -> int:
            return 2 * source.path.stat().st_size

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[str(source.path)], exec_stats=None)
            return [ReadTask(source.blocks, meta)]

        def get_name(self) -> str:
            return "ia3Rows"

    return _Source()


class Predictor:
    """A Ray Data actor: one base with the used adapters, predicting blocks of rows as ``ia3 predict`` does.

    Args:
        named: Adapter names -> run dirs (every adapter a row may name).
        used: The adapters loaded (the first decides the base).
        options: ``adapter_column``, ``choices_column`` and the keywords of :func:`ia3cli.inference.jobs.run`.
    """

    def __init__(self, named: dict[str, Path], used: list[str], options: dict[str, Any]) -> None:
        from ia3cli.inference import jobs

        self.named, self.options = {n: Path(p) for n, p in named.items()}, dict(options)
        self.recipes = single.recipes_of(self.named)
        self.mixed = jobs.load(self.named, used, device=options.get("device"))

    def __call__(self, block: dict[str, Any]) -> dict[str, list[str]]:
        from ia3cli.inference import jobs

        o = self.options
        rows = [
            (where, None if data is None else pickle.loads(data), problem)
            for where, data, problem in zip(block["where"], block["row"], block["problem"], strict=True)
        ]
        # bad rows: the driver found and reported them already; the good ones come back in input order
        todo, _ = single.jobs_from_rows(rows, self.named, self.recipes, o["adapter_column"], o["choices_column"])
        run = {k: o[k] for k in ("batch_size", "max_new_tokens", "temperature", "top_p", "seed")}
        jobs.run(self.mixed, todo, **run, printer=lambda _: None)
        return {"line": [output_line(job) for job in sorted(todo, key=lambda j: j.index)]}


def _scan(
    input_path: Path, named: dict[str, Path], recipes: dict[str, Any], columns: tuple[str, str | None]
) -> tuple[int, list[dict[str, Any]], list[str]]:
    """One pass over the rows on the driver, a block at a time: how many are good, the bad ones, the adapters used."""
    good, errors, seen = 0, [], set()
    rows = iter_rows(input_path)
    while block := list(itertools.islice(rows, BLOCK_ROWS)):
        jobs, bad = single.jobs_from_rows(block, named, recipes, *columns)
        good, seen = good + len(jobs), seen | {job.adapter for job in jobs}
        errors += bad
    return good, errors, [n for n in named if n in seen]


def _cause(exc: BaseException) -> BaseException:
    """The Ia3Error behind a Ray task or actor failure, if there is one."""
    seen = exc
    while seen is not None:
        if isinstance(seen, Ia3Error):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return exc


def predict_on_ray(
    source: Path | None,
    input_path: Path,
    output: Path | None = None,
    *,
    workers: int = 1,
    worker_cpus: float = 1.0,
    ray_address: str | None = None,
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
) -> single.PredictResult:
    """``ia3 predict`` on Ray (see the module docstring); the arguments are those of
    :func:`ia3cli.inference.predict.predict`, plus ``workers`` (actors), ``worker_cpus`` (CPUs each) and
    ``ray_address`` (a cluster to join; default: the one this process is connected to, else a new local one);
    ``device`` is where each worker loads the base (a worker gets no GPU from Ray, so ``auto`` is its CPU).

    Raises:
        Ia3Error: as ``ia3 predict``; for a bad ``workers``; for a cluster that cannot be reached.
    """
    if workers < 1 or worker_cpus <= 0:
        raise Ia3Error(f"--workers {workers}: must be >= 1 (and CPUs per worker > 0)")
    settings = (batch_size, max_new_tokens, temperature, top_p)
    input_path, named, recipes, output = single.prepare(source, input_path, output, adapters, on_error, settings)
    good, errors, used = _scan(input_path, named, recipes, (adapter_column, choices_column))
    single.report_bad_rows(errors, on_error, input_path, output, printer)
    generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    model = recipes[used[0] if used else next(iter(named))].model
    meta = single.sidecar_meta(
        input_path, {n: named[n] for n in used}, model.name, model.task, good, errors, generation
    )
    options = {"adapter_column": adapter_column, "choices_column": choices_column, "device": device, **generation}
    options["batch_size"] = batch_size
    lines = (
        _on_ray(input_path, named, used, options, (workers, worker_cpus, ray_address), good, printer) if good else []
    )
    _publish(output, input_path, lines, meta)
    return single.PredictResult(output, good + len(errors), good, errors, used)


def _on_ray(
    input_path: Path,
    named: dict[str, Path],
    used: list[str],
    options: dict[str, Any],
    cluster: tuple[int, float, str | None],
    good: int,
    printer: Callable[[str], None],
) -> Iterator[str]:
    """The output lines, in input order, as the actors return them."""
    import ray
    from ray.data import DataContext

    from ia3cli.inference.jobs import Progress

    workers, worker_cpus, address = cluster
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, ValueError) as exc:
            hint = "start one with `ray start --head`, or leave out --ray-address for a local cluster"
            raise Ia3Error(f"--ray-address {address}: cannot connect: {exc}", hint) from None
    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # output lines in input order
    context.enable_progress_bars = False
    printer(f"predict on Ray: {good} rows, adapters {', '.join(used)}, {workers} worker(s)")
    runs = {k: str(v.resolve()) for k, v in named.items()}
    dataset = ray.data.read_datasource(datasource(input_path), num_cpus=0).map_batches(
        Predictor,
        fn_constructor_kwargs={"named": runs, "used": used, "options": options},
        batch_size=None,  # one read block per call: its rows are sorted by length and batched inside
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=worker_cpus,
    )
    progress = Progress(good, printer)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            done = [line for line in batch["line"] if line is not None]
            progress.advance(len(done))
            yield from done
    except Exception as exc:
        cause = _cause(exc)
        if isinstance(cause, Ia3Error):
            raise cause from None
        raise
    finally:
        if started:
            ray.shutdown()


def _publish(output: Path, input_path: Path, lines: Any, meta: dict[str, Any]) -> None:
    """Stream ``lines`` into a temporary sibling of ``output``, write the sidecar, rename: old or new, never half."""
    from ia3cli.outputs import write_atomic

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        single.check_output(output, input_path)  # again: a file may have appeared there while the model ran
        write_atomic(single.sidecar(output), json.dumps(meta, indent=2, default=str) + "\n")
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
