"""``ia3 export RUN OUT.gguf``: one GGUF file with the IA3 vectors folded in, for llama.cpp, Ollama and LM Studio.

Those runtimes cannot apply an IA3 adapter at run time, but IA3 folds exactly into the weights: a key/value vector
scales the rows of its projection (and its bias), a feed-forward vector the columns of the down-projection.

1. The run is folded as ``ia3 merge`` folds it (:func:`ia3cli.inference.merge.fold`): the full-precision base
   (of a 4/8-bit run too) plus the adapter, ``merge_and_unload``, checked against the adapter's logits.
2. **A base read from a GGUF file** (``model.gguf_file``): every tensor of the source file is copied unchanged,
   with all metadata and the tokenizer, except the tensors of the adapted layers: those are taken from the merged
   model (that is: dequantised, scaled), put back in the file's row order (llama.cpp interleaves the Q/K rows of
   each head for its rotary embedding, so a ``k_proj`` vector is interleaved with them) and quantised to
   ``--type``, by default the source tensor's own type, or q8_0 (:func:`default_type`).
3. **A Hugging Face base** of the Llama family (llama, mistral, qwen2): the whole merged model is written, with the
   architecture metadata and the tokenizer (:mod:`ia3cli.inference.gguf_write`), every 2-D weight in ``--type`` (default
   q8_0).
4. **Proof.** The file is loaded back with transformers' GGUF loader (which dequantises it) and run on the probe
   batch; its logits must match the merged model's within ``rtol * max(1, max|logit|)``, rtol per type
   (:data:`RTOL`). The report ``OUT.export.json`` gives the type, the source, max |delta logits| and how often
   the greedy (arg-max) token agrees at the probe positions.
5. ``OUT.Modelfile`` for Ollama (:mod:`ia3cli.inference.ollama`). The GGUF is written to a temporary sibling and
   renamed into place only after the proof passes, then the report and Modelfile (each atomically); an existing
   OUT is replaced only with ``--force`` and only when its ``OUT.export.json`` shows ia3cli wrote it.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia3cli import __version__
from ia3cli.errors import Ia3Error, RunError
from ia3cli.inference.gguf_write import TYPES
from ia3cli.report.console import Console

if TYPE_CHECKING:
    import numpy as np
    import torch

# Allowed max |delta logits| relative to max(1, max|logit|). Measured (tiny random Llama/Qwen2 of the tests; the
# SmolLM2 quick-start run of bench/export.py, max|logit| ~34, at step 20 and at the end, step 50): f32 0 and 0; f16
# 3.2e-4 and 1.1e-3; bf16 2.7e-3 (tiny only); q8_0 7.9e-3 and 4.1e-2 / 6.4e-2 (all 90 folded tensors q8_0); q4_*
# 0.13 and 0.28 (all q4_1). Each bound is about 2-5x the largest error measured. f32/f16/bf16 are below what a
# wrong fold (vectors ignored: 0.16-0.25; K rows not interleaved: 1.0e-2-2.4e-2 on the tiny models) gives, so the
# proof catches those; at q8_0 and 4 bits the rounding alone moves the logits about as much as a small adapter does,
# and the check only catches gross errors.
RTOL = {"f32": 1e-4, "f16": 5e-3, "bf16": 2e-2, "q8_0": 0.2, "q4_1": 0.5, "q4_0": 0.5}
QUANTISABLE = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q4_1": "q4_1", "Q4_0": "q4_0"}
FALLBACK_TYPE = "q8_0"


def outputs(out: Path) -> dict[str, Path]:
    """The files one export writes: the GGUF, its report (the ownership marker) and the Ollama Modelfile."""
    stem = out.with_suffix("")
    return {"gguf": out, "report": Path(f"{stem}.export.json"), "modelfile": Path(f"{stem}.Modelfile")}


def _check_out(out: Path, force: bool) -> None:
    if out.suffix != ".gguf":
        raise Ia3Error(f"{out}: OUT must end in .gguf", f"e.g. {out.with_suffix('.gguf')}")
    files = outputs(out)
    taken = [p for p in files.values() if p.exists()]
    if not taken:
        return
    if any(p.is_dir() for p in taken):
        raise Ia3Error(f"{next(p for p in taken if p.is_dir())}: is a directory", "choose another OUT")
    owned = _owned(files["report"], out.name)
    if not owned:
        shown = ", ".join(str(p) for p in taken)
        raise Ia3Error(
            f"OUT: {shown} already exist(s) and ia3cli did not write them (no {files['report'].name} naming "
            f"{out.name}); `ia3 export` never replaces other files",
            "choose another OUT; nothing was touched",
        )
    if not force:
        raise Ia3Error(f"{out}: an earlier export is there", "pass --force to replace it, or choose another OUT")


def _owned(report: Path, gguf_name: str) -> bool:
    from ia3cli.outputs import read_json_object

    data = read_json_object(report)
    return data.get("gguf") == gguf_name and "ia3cli" in data.get("versions", {})


def _check_run(recipe: Any, run_dir: Path) -> None:
    if recipe.model.task != "causal-lm":
        raise Ia3Error(
            f"{run_dir}: a {recipe.model.task} run cannot be exported to GGUF: `ia3 export` supports causal-lm runs "
            "of the llama, mistral and qwen2 families",
            f"use `ia3 merge {run_dir} OUT` for a plain transformers checkpoint",
        )
    if recipe.adapter.method != "ia3":
        raise Ia3Error(
            f"{run_dir}: adapter.method '{recipe.adapter.method}': `ia3 export` folds IA3 adapters only",
            f"use `ia3 merge {run_dir} OUT`",
        )


def source_gguf(recipe: Any) -> Path | None:
    """The GGUF file the run's base was read from, or ``None`` for a Hugging Face base."""
    if not recipe.model.gguf_file:
        return None
    return Path(recipe.model.path) / recipe.model.gguf_file


def _state_dict(model: Any) -> dict[str, np.ndarray]:
    return {name: t.detach().float().cpu().numpy() for name, t in model.state_dict().items()}


def fold_into_source(
    path: Path,
    source: Path,
    tensors: dict[str, np.ndarray],
    adapted: dict[str, bool],
    config: Any,
    type_name: str | None,
) -> dict[str, int]:
    """Copy ``source`` (a GGUF file) to ``path``, with the tensors of the ``adapted`` parameters replaced.

    Args:
        path: The file to write.
        source: The GGUF file the run's base came from.
        tensors: The merged model's float32 state dict.
        adapted: Names in ``tensors`` that the fold changed (weights, and biases of row-scaled layers), each mapped
            to whether its columns were scaled (feed-forward).
        config: The model config (heads, for the rotary row order).
        type_name: The type of the replaced tensors; ``None``: see :func:`default_type`.

    Returns:
        How many replaced tensors were stored in each type.

    Raises:
        Ia3Error: when an adapted parameter has no tensor in the source file.
    """
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from ia3cli.inference.gguf_write import encode, gguf_arch, gguf_names, to_file_order

    reader = GGUFReader(str(source))
    arch = str(reader.fields["general.architecture"].contents())
    if arch != gguf_arch(config):
        raise Ia3Error(f"{source}: architecture '{arch}' is not the '{gguf_arch(config)}' the export writes")
    names = gguf_names(list(adapted), arch, config.num_hidden_layers)
    replaced = {names.get(n): n for n in adapted}
    present = {t.name for t in reader.tensors}
    missing = [n for g, n in replaced.items() if g not in present]
    if missing:
        raise Ia3Error(f"{source}: no tensor for the adapted {', '.join(missing[:3])}")
    writer = GGUFWriter(str(path), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.alignment":
            writer.add_custom_alignment(int(field.contents()))
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        if t.name not in replaced:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            continue
        wanted = type_name or default_type(t.tensor_type.name, adapted[replaced[t.name]])
        data, stored = encode(to_file_order(t.name, tensors[replaced[t.name]], arch, config), wanted)
        writer.add_tensor(t.name, data, raw_dtype=stored)
        counts[stored.name] = counts.get(stored.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def default_type(source_type: str, columns_scaled: bool) -> str:
    """The type a replaced tensor gets without ``--type``: its source type when the ``gguf`` package can quantise
    it, else q8_0; and q8_0 for a 4-bit tensor whose columns were scaled.

    A quantisation block lies within one row, so scaling rows keeps each block on its grid and re-quantising to the
    source type loses nothing but the f16 rounding of the block scales. Scaling columns moves every value off the
    grid, and 4-bit rounding erases scalings of a few percent, which is what trained IA3 vectors are: on the
    quick-start run, all-q4_1 gave max |delta logits| 9.4 and 86% greedy agreement (bench/export.py).
    """
    name = QUANTISABLE.get(source_type)
    if name is None or (columns_scaled and name in ("q4_0", "q4_1")):
        return FALLBACK_TYPE
    return name


def adapter_vectors(run_dir: Path) -> dict[str, bool]:
    """The IA3 vectors saved in a run dir, each mapped to whether it is a feed-forward vector: PEFT keeps those as
    ``(1, in_features)``, any other as ``(out_features, 1)``."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter_model.safetensors"), framework="np") as f:
        names = f.keys()  # a safe_open handle is not iterable
        return {name: f.get_slice(name).get_shape()[0] == 1 for name in names if ".ia3_l" in name}


def adapted_parameters(vectors: dict[str, bool], tensors: dict[str, Any]) -> dict[str, bool]:
    """The merged model's parameters a fold changed, from the adapter's ``...<module>.ia3_l.<adapter>`` names
    (mapped to whether the vector is feed-forward): each adapted module's weight, and its bias unless the vector
    scaled the module's input (feed-forward); each mapped to whether its columns (not rows) were scaled."""
    adapted = {}
    for name, feedforward in vectors.items():
        module = name.split(".ia3_l")[0].removeprefix("base_model.model.")
        adapted[f"{module}.weight"] = feedforward
        if not feedforward and f"{module}.bias" in tensors:
            adapted[f"{module}.bias"] = False
    return adapted


def compare(expected: torch.Tensor, got: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Max |delta logits| and the share of real (unpadded) positions whose arg-max token agrees."""
    real = mask.bool()
    diff = float((got - expected).abs()[real].max())
    agree = float((got.argmax(-1) == expected.argmax(-1))[real].float().mean())
    return diff, agree


def _forward(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 logits of ``model`` on the probe batch, on the CPU."""
    import torch

    from ia3cli.models.device import to_inputs

    inputs = to_inputs({k: batch[k] for k in ("input_ids", "attention_mask")}, model)
    with torch.no_grad():
        return model(**inputs).logits.float().cpu()


def _reload_logits(path: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the GGUF file at ``path`` as transformers' GGUF loader reads it (dequantised to float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    del model
    gc.collect()
    return logits


def export(
    run_dir: Path,
    out: Path,
    *,
    type_name: str | None = None,
    force: bool = False,
    printer: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export a run as one GGUF file with its IA3 vectors folded in, prove it, and write the report and Modelfile.

    Args:
        run_dir: Output dir of ``ia3 train`` (an IA3 causal-lm run of the llama, mistral or qwen2 family).
        out: The ``.gguf`` file to write; ``OUT.export.json`` and ``OUT.Modelfile`` go beside it.
        type_name: One of :data:`TYPES`; default: the source tensors' types (GGUF base) or q8_0.
        force: Replace an earlier export at OUT.
        printer: Receives one line per stage.

    Returns:
        The report saved as ``OUT.export.json``.

    Raises:
        Ia3Error: bad run dir, task, method or family, bad ``--type``, an OUT ia3cli did not write.
        RunError: when the exported file does not reproduce the merged model (nothing is written then).
    """
    from ia3cli.config.load import load_recipe
    from ia3cli.inference import gguf_write, merge, ollama
    from ia3cli.models.loading import load_config
    from ia3cli.outputs import write_atomic

    run_dir, out = Path(run_dir), Path(out)
    started = time.monotonic()

    def stage(tag: str, text: str) -> None:
        if printer is not None:
            printer(Console.event(tag, text, {}, f"[{time.monotonic() - started:.1f}s]"))

    if type_name is not None and type_name not in TYPES:
        raise Ia3Error(f"--type: '{type_name}' is not supported", f"use one of {', '.join(TYPES)}")
    merge.check_run_dir(run_dir, "export")
    _check_out(out, force)
    recipe = load_recipe(run_dir / "recipe.yaml")
    _check_run(recipe, run_dir)
    gguf_write.gguf_arch(load_config(recipe.model))  # refuse other families before loading any weights

    merged, tokenizer, probe = merge.fold(run_dir, recipe, stage)
    report = _write_and_prove(merged, probe, recipe, run_dir, out, type_name, stage)
    files = outputs(out)
    write_atomic(files["report"], json.dumps(report, indent=2) + "\n")
    write_atomic(files["modelfile"], ollama.modelfile(out.name, tokenizer))
    return report


def _write_and_prove(
    merged: Any,
    probe: Any,
    recipe: Any,
    run_dir: Path,
    out: Path,
    type_name: str | None,
    stage: Callable[[str, str], None],
) -> dict[str, Any]:
    """Write the GGUF to a temporary sibling of OUT, prove it against the merged model, rename it to OUT."""
    from ia3cli.inference import gguf_write
    from ia3cli.outputs import file_mode

    source = source_gguf(recipe)
    tensors = _state_dict(merged)
    adapted = adapted_parameters(adapter_vectors(run_dir), tensors)
    expected = _forward(merged, probe.batch)
    config = merged.config
    del merged
    gc.collect()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.tmp-", suffix=".gguf")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if source is not None:
            counts = fold_into_source(tmp, source, tensors, adapted, config, type_name)
            what = f"{len(adapted)} adapted tensors of {source.name} replaced, the rest copied"
        else:
            counts = gguf_write.write_hf(tmp, tensors, config, run_dir, type_name or FALLBACK_TYPE, recipe.model.name)
            what = f"{sum(counts.values())} tensors of the merged model written"
        del tensors
        stage("write", f"{what} ({', '.join(f'{k} x{v}' for k, v in sorted(counts.items()))})")
        diff, agree = compare(expected, _reload_logits(tmp, probe.batch), probe.batch["attention_mask"])
        worst = max([QUANTISABLE.get(k, FALLBACK_TYPE) for k in counts], key=lambda k: RTOL[k], default="f32")
        tol = RTOL[worst] * max(1.0, float(expected.abs().max()))
        if not diff <= tol:
            raise RunError(
                f"export check failed: the GGUF file's logits differ from the merged model's by {diff:.3e} "
                f"(tolerance {tol:.1e} for {worst}) on {len(expected)} probe rows; nothing was written to {out}",
                "try a wider --type (q8_0, f16), or run again with --debug and report it",
            )
        stage("verify", f"reloaded by transformers: max |delta logits| {diff:.2e} <= {tol:.1e}, greedy {agree:.1%}")
        report = {
            "gguf": out.name,
            "type": type_name or ("source" if source is not None else FALLBACK_TYPE),
            "tensor_types": counts,
            "source": str(source) if source is not None else recipe.model.name,
            "source_kind": "gguf" if source is not None else "huggingface",
            "adapter": str(run_dir),
            "trained_quantization": recipe.model.quantization,
            "max_abs_diff": diff,
            "tolerance": tol,
            "tolerance_type": worst,
            "greedy_agreement": agree,
            "max_abs_logit": float(expected.abs().max()),
            "merge_max_abs_diff": probe.diff32,
            "probe_rows": len(expected),
            "probe_source": probe.source,
            "probe_warning": probe.warning,
            "modelfile": outputs(out)["modelfile"].name,
            "bytes": tmp.stat().st_size,
            "versions": _versions(),
        }
        os.chmod(tmp, file_mode())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return report


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"ia3cli": __version__, "transformers": version("transformers"), "gguf": version("gguf")}
