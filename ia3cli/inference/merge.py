"""``ia3 merge RUN OUT``: fold the IA3 vectors into the base weights, prove the outputs match, save.

LoRA runs (``adapter.method: lora``) merge the same way through PEFT; ``full`` and ``head`` runs are full models
already and are refused with a message saying so.

1. The run dir is self-describing: ``recipe.yaml`` names the base, ``adapter_config.json`` the adapter.
2. The base is reloaded in float32 and *unquantised*, even for a run trained in 4/8-bit: PEFT cannot merge IA3
   into quantised layers, and the scaled weights must be stored in full precision anyway.
3. A probe batch (up to 8 rows of the run's eval split, else its train split, else random tokens, with a warning in
   ``merge_report.json`` and on the console saying why) goes through the adapter model; ``merge_and_unload`` folds
   each ``ia3_l`` into its layer (rows of the output projection, or columns for feed-forward layers; GPT-2's Conv1D
   transposed) and keeps trained heads (``modules_to_save``).
4. The float32 merged model must reproduce the adapter's logits to ``1e-4 * max(1, max|logit|)``.
5. The model (cast to ``--dtype``), tokenizer, recipe.yaml, a model card and ``merge_report.json`` are saved into a
   temporary sibling ``.OUT.tmp-XXXX``; the saved model is reloaded with plain ``AutoModelFor*.from_pretrained``
   and checked against the adapter's logits again. For float32 the tolerance is the one above; bfloat16/float16
   round every weight and activation (8/11 significant bits), so the cast copy is held to a tolerance relative to
   the logit scale: ``rtol * max(1, max|logit|)`` with rtol 0.05 (bfloat16) or 0.01 (float16), and must be finite
   (float16 overflows above 65504).
6. Only then is the temporary dir renamed to OUT (an old OUT, with ``--force``, is moved aside first and deleted
   after the swap). Any failure removes the temporary dir: OUT is either complete or untouched.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia3cli import __version__
from ia3cli.errors import DataError, Ia3Error, RecipeError, RunError
from ia3cli.models.device import input_device, load_kwargs, to_inputs
from ia3cli.models.device import resolve as resolve_device
from ia3cli.models.loading import auto_class
from ia3cli.outputs import MERGE_MARKER, check_replaceable, remove_output
from ia3cli.report.console import Console

if TYPE_CHECKING:
    import torch

    from ia3cli.config.recipe import Recipe

FLOAT32_RTOL = 1e-4
CAST_RTOL = {"float32": FLOAT32_RTOL, "bfloat16": 5e-2, "float16": 1e-2}
PROBE_ROWS = 8
MAX_SHARD_SIZE = "5GB"


def tolerance(dtype: str, logits: torch.Tensor) -> float:
    """Allowed max |delta logits| for a model saved in ``dtype``: ``rtol * max(1, max|logit|)``."""
    return CAST_RTOL[dtype] * max(1.0, float(logits.abs().max()))


def check_run_dir(run_dir: Path, command: str = "merge") -> None:
    """Refuse a path that is not a finished run dir, or a ``full``/``head`` run (a full model already).

    Raises:
        Ia3Error: naming what is missing; ``command`` (merge, export) is named in the message.
    """
    hint = "pass the output_dir of a finished `ia3 train` (it holds adapter_config.json and recipe.yaml)"
    if not run_dir.is_dir():
        raise Ia3Error(f"{run_dir}: run directory not found", hint)
    method = _run_method(run_dir)
    if method in ("full", "head"):
        raise Ia3Error(
            f"{run_dir}: trained with adapter.method '{method}', so it is already a full model: nothing to {command}",
            f"load it as it is: ia3 eval {run_dir}, or AutoModelFor*.from_pretrained('{run_dir}')",
        )
    for name in ("adapter_config.json", "recipe.yaml"):
        if not (run_dir / name).is_file():
            raise Ia3Error(f"{run_dir}: no {name} (not a finished run dir)", hint)
    if not any((run_dir / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise Ia3Error(f"{run_dir}: no adapter_model.safetensors (not a finished run dir)", hint)


def _check_paths(run_dir: Path, out: Path, force: bool) -> None:
    check_run_dir(run_dir)
    if out.exists() and not out.is_dir():
        raise Ia3Error(f"{out}: exists and is a file", "choose another OUT")
    run_abs, out_abs = run_dir.resolve(), out.resolve()
    if out_abs == run_abs or run_abs.is_relative_to(out_abs) or out_abs.is_relative_to(run_abs):
        hint = f"e.g. ia3 merge {run_dir} {run_dir}-merged"
        raise Ia3Error(f"{out}: OUT must lie outside the run dir {run_dir} (and not contain it)", hint)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise Ia3Error(f"{out}: not empty", "pass --force to replace an earlier merge, or choose another OUT")
        check_replaceable(out, MERGE_MARKER, key="OUT", flag="--force", keep=(run_abs,))


def _run_method(run_dir: Path) -> str:
    """``adapter.method`` of the run's saved recipe (``ia3`` when unreadable: the other checks report that)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
        return str(saved["adapter"].get("method", "ia3"))
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return "ia3"


def probe_batch(recipe: Recipe, tokenizer: Any, vocab_size: int) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """Up to 8 encoded rows of the run's eval (else train) split, or random tokens when the data is unavailable.

    Returns:
        The batch, where it came from (``PATH [split]`` or ``random tokens``) and, for random tokens, a warning
        saying why the data could not be used (each split's error).
    """
    import torch

    from ia3cli.data.checks import check_rows
    from ia3cli.data.encoding import encode_row
    from ia3cli.data.sources import load_split
    from ia3cli.scoring.loglik import pad_batch, pad_id

    d = recipe.data
    pad = pad_id(tokenizer)
    problems: list[str] = []
    for split in dict.fromkeys(s for s in (d.eval_split, d.train_split) if s is not None):
        source = f"{d.path} [{split}]"
        try:
            ds = load_split(d, split)
            ds = ds.select(range(min(PROBE_ROWS, len(ds))))
            check_rows(ds, recipe, source)  # a row that would not encode is reported, not a crash
            feats = [encode_row(row, recipe, tokenizer, source=source, index=i) for i, row in enumerate(ds, 1)]
        except (DataError, RecipeError) as exc:  # moved or unreadable data, a bad row: try the next source
            problems.append(exc.message)
            continue
        if feats:
            return pad_batch(feats, pad), source, None
        problems.append(f"{source}: split is empty")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(10, vocab_size - 1), vocab_size, (4, 16), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if recipe.model.task == "seq2seq":
        batch["labels"] = torch.randint(min(10, vocab_size - 1), vocab_size, (4, 8), generator=gen)
    warning = (
        "the run's data could not be used (" + "; ".join(problems) + "): the outputs were compared on random tokens"
    )
    return batch, "random tokens", warning


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(**to_inputs(batch, model)).logits.float().cpu()


def _model_card(recipe: Recipe, run_dir: Path, out: Path, report: dict[str, Any]) -> str:
    auto = auto_class(recipe.model.task).__name__
    warning = f"\nWarning: {report['probe_warning']}." if report["probe_warning"] else ""
    return f"""---
base_model: {recipe.model.name}
tags: [ia3, ia3cli, merged]
---
# `{recipe.model.name}` with a merged IA3 adapter

The IA3 vectors of the run `{run_dir}` are folded into the base weights (ia3cli {__version__}); this is a plain
`transformers` checkpoint ({report["dtype"]}) that needs no PEFT:

```python
from transformers import {auto}, AutoTokenizer

model = {auto}.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```

Checked before saving: on {report["probe_rows"]} probe rows ({report["probe_source"]}) the saved model's logits
differ from the adapter's by at most {report["max_abs_diff"]:.2e} (tolerance {report["tolerance"]:.2e}).{warning}
`recipe.yaml` is the run's recipe (`ia3 eval` reads it); `merge_report.json` has the details.
"""


def merge(
    run_dir: Path,
    out: Path,
    *,
    dtype: str = "float32",
    force: bool = False,
    printer: Callable[[str], None] | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Merge a run's IA3 adapter into its full-precision base and save a plain checkpoint in OUT.

    Args:
        run_dir: Output dir of ``ia3 train``.
        out: Where to write the merged model.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the saved weights.
        force: Replace a non-empty OUT.
        printer: Receives one line per stage (load, merge, check, save, verify).
        device: Where the adapter, the merged model and the reloaded copy run the proof (``--device``).

    Returns:
        The merge report (also saved as ``OUT/merge_report.json``), with ``max_abs_diff`` and ``probe_rows``.

    Raises:
        Ia3Error: missing run dir or adapter, bad ``--dtype``, non-empty OUT without ``force``.
        RunError: when the merged model does not reproduce the adapter's logits (nothing is written then).
    """
    import torch

    from ia3cli.config.load import load_recipe

    run_dir, out = Path(run_dir), Path(out)
    started = time.monotonic()

    def stage(tag: str, text: str) -> None:
        if printer is not None:
            printer(Console.event(tag, text, {}, f"[{time.monotonic() - started:.1f}s]"))

    resolve_device(device)  # a device that is not there fails before anything is loaded
    if dtype not in CAST_RTOL:
        raise Ia3Error(f"--dtype: '{dtype}' is not supported", f"use one of {', '.join(CAST_RTOL)}")
    _check_paths(run_dir, out, force)
    recipe = load_recipe(run_dir / "recipe.yaml")
    merged, tokenizer, probe = fold(run_dir, recipe, stage, device)
    if dtype != "float32":
        merged = merged.to(getattr(torch, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        merged.save_pretrained(str(tmp), max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(str(tmp))
        shutil.copyfile(run_dir / "recipe.yaml", tmp / "recipe.yaml")
        del merged
        gc.collect()
        stage("save", f"{dtype} safetensors, tokenizer and recipe.yaml, into a temporary folder beside {out}")
        report = _verify_saved(tmp, recipe, run_dir, dtype, probe, stage)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(recipe, run_dir, out, report), encoding="utf-8")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


@dataclass
class Probe:
    """The probe batch a merge is proven on, the adapter's own logits on it, and the float32 merge check."""

    batch: dict[str, Any]
    reference: Any
    source: str
    warning: str | None
    diff32: float
    tol32: float
    device: str  # the --device asked for
    on: str  # where the adapter's forward ran


def fold(run_dir: Path, recipe: Any, stage: Callable[[str, str], None], device: str = "auto") -> tuple[Any, Any, Probe]:
    """The run's adapter loaded on the float32, unquantised base (on ``device``) and folded into its weights,
    checked in memory.

    Raises:
        RunError: when the merged model's logits differ from the adapter's beyond the float32 tolerance.
    """
    from ia3cli.tuners import ia3

    full = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"quantization": "none", "dtype": "float32"})}
    )
    model, tokenizer = ia3.load_run_model(run_dir, full, device=device)
    model.eval()
    on = str(input_device(model))
    trained = "" if recipe.model.quantization == "none" else f", trained in {recipe.model.quantization}"
    stage("load", f"{recipe.model.name} in float32 (unquantised{trained}) + the IA3 adapter of {run_dir}, on {on}")
    vectors = sum(1 for name, _ in model.named_parameters() if ".ia3_l." in name)
    batch, source, probe_warning = probe_batch(recipe, tokenizer, model.get_input_embeddings().num_embeddings)
    reference = _logits(model, batch)
    merged = model.merge_and_unload()
    del model
    stage("merge", f"{vectors} IA3 vectors folded into the base weights")
    diff32 = float((_logits(merged, batch) - reference).abs().max())
    tol32 = tolerance("float32", reference)
    if not diff32 <= tol32:
        raise RunError(
            f"merge check failed: the merged model's logits differ from the adapter's by {diff32:.3e} "
            f"(tolerance {tol32:.1e}) on {len(reference)} probe rows; nothing was written",
            "run again with --debug and report it; the run dir is untouched",
        )
    stage("check", f"float32 max |delta logits| {diff32:.1e} <= {tol32:.1e} on {len(reference)} rows of {source}")
    return merged, tokenizer, Probe(batch, reference, source, probe_warning, diff32, tol32, device, on)


def _verify_saved(
    tmp: Path, recipe: Any, run_dir: Path, dtype: str, probe: Probe, stage: Callable[[str, str], None]
) -> dict[str, Any]:
    """Reload what was saved with plain transformers (no PEFT), compare its logits, and return the merge report."""
    import peft
    import torch
    import transformers

    reloaded = auto_class(recipe.model.task).from_pretrained(
        str(tmp),
        dtype=getattr(torch, dtype),
        trust_remote_code=recipe.model.trust_remote_code,
        **load_kwargs(probe.device, recipe.model.device_map),
    )
    reloaded.eval()
    reference = probe.reference
    diff = float((_logits(reloaded, probe.batch) - reference).abs().max())
    del reloaded
    tol = tolerance(dtype, reference)
    if not diff <= tol:
        raise RunError(
            f"merge check failed: the saved {dtype} model's logits differ from the adapter's by {diff:.3e} "
            f"(tolerance {tol:.1e}) on {len(reference)} probe rows; nothing was written",
            "try --dtype float32 (float16 overflows on some models)" if dtype != "float32" else None,
        )
    stage("verify", f"reloaded without PEFT: {dtype} max |delta logits| {diff:.1e} <= {tol:.1e}")
    return {
        "base_model": recipe.model.name,
        "adapter": str(run_dir),
        "task": recipe.model.task,
        "trained_quantization": recipe.model.quantization,
        "dtype": dtype,
        "max_abs_diff": diff,
        "tolerance": tol,
        "float32_max_abs_diff": probe.diff32,
        "float32_tolerance": probe.tol32,
        "max_abs_logit": float(reference.abs().max()),
        "probe_rows": len(reference),
        "probe_source": probe.source,
        "probe_warning": probe.warning,
        "device": probe.on,
        "versions": {"ia3cli": __version__, "peft": peft.__version__, "transformers": transformers.__version__},
    }


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is moved aside first and deleted afterwards."""
    old = None
    if out.exists():
        check_replaceable(out, MERGE_MARKER, key="OUT", flag="--force")  # again: it may have changed meanwhile
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "out")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "out", out)
            old.rmdir()
        raise
    if old is not None:
        remove_output(old / "out", MERGE_MARKER, key="OUT", flag="--force")
        old.rmdir()
