"""``ia3 report RUN``: one figure (PNG, or a self-contained HTML page) that shows how a run went.

:func:`build` reads the run dir and returns the report *data*, a plain dict that tests check; :func:`draw` and
:func:`to_html` only draw it. Panels and their sources:

- training loss, learning rate, evaluation loss and metrics over optimiser steps: ``logs/train_log.jsonl`` (written
  by ``ia3 train``; for runs made before it existed, the newest checkpoint's ``trainer_state.json``);
- per-group (k, v, ff, ...) pre-clip gradient norm and drift (mean ``|l - 1|``) over steps, from the health
  monitor's ``ia3/*`` values in the same log, with the recipe's ``monitor.vanishing_below`` and
  ``monitor.exploding_above`` drawn;
- a histogram of the learned vectors of each group: how many dimensions are amplified (``l > 1``) or inhibited
  (``l < 1``), and by how much; a layer x group heatmap of mean ``|l - 1|``; the most amplified and most inhibited
  dimensions of each group (module, index, value): ``adapter_model.safetensors`` (keys ending in ``ia3_l``).

What a run lacks (no log, no adapter yet) is left out and said so in ``missing``, on the figure and in the page.
matplotlib (Agg backend) is imported inside :func:`draw`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ia3cli.errors import Ia3Error, RunError
from ia3cli.outputs import read_json_object, write_atomic

GROUP_ORDER = ("q", "k", "v", "qkv", "ff", "other")
TOP_K = 5
HIST_BINS = 30

_LAYER = re.compile(r"\.(\d+)(?=\.|$)")
_HIDDEN = ("_runtime", "_per_second")


def vector_group(
    module: str, feedforward_modules: list[str] | str | None = None, groups: dict[str, str] | None = None
) -> str:
    """The IA3 group of a module: ``k``, ``v``, ``q``, ``qkv``, ``ff`` or ``other``.

    A run records the target plan's groups in ``run.json`` (the ones the health monitor used); those decide. For
    older runs the role comes from the family table (``ia3cli.config.families``, the longest matching suffix of any
    family), and ``ff`` follows the adapter's ``feedforward_modules`` by PEFT's rule (a regex must match the whole
    name, a list entry must end it), else the FFN down-projection role.

    Args:
        module: Module name inside the base model, e.g. ``model.layers.0.self_attn.k_proj``.
        feedforward_modules: The adapter config's ``feedforward_modules``.
        groups: ``run.json``'s module -> group mapping, when the run has one.
    """
    from ia3cli.config.families import FAMILIES, group_of, role_in

    if groups and module in groups:
        return groups[module]
    role = next((r for fam in FAMILIES.values() if (r := role_in(fam.roles, module)) is not None), None)
    if isinstance(feedforward_modules, str):
        is_ff = re.fullmatch(feedforward_modules, module) is not None
    elif feedforward_modules:
        is_ff = any(module.endswith(f) for f in feedforward_modules)
    else:
        is_ff = role == "ffn_down"
    return group_of(role, is_ff)


def layer_of(module: str) -> tuple[int, int] | None:
    """``(stack, index)`` of a module's layer: stack 1 for a decoder of an encoder-decoder model, else 0."""
    match = _LAYER.search(module)
    if match is None:
        return None
    return (1 if "decoder" in module[: match.start()].split(".") else 0, int(match.group(1)))


def _layer_label(key: tuple[int, int]) -> str:
    return f"dec {key[1]}" if key[0] else str(key[1])


# ---- reading a run ------------------------------------------------------------------------------------------------


def read_history(run: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The logged steps of a run and where they came from (``None`` and ``[]`` when there is no log).

    ``logs/train_log.jsonl`` first (a torn last line after a kill is skipped); else the ``log_history`` of the newest
    checkpoint's ``trainer_state.json``.
    """
    path = run / "logs" / "train_log.jsonl"
    if path.is_file():
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
        return records, "logs/train_log.jsonl"
    states = sorted(
        run.glob("checkpoints/checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.rsplit("-", 1)[-1]) if p.parent.name.rsplit("-", 1)[-1].isdigit() else -1,
    )
    for state in reversed(states):
        try:
            history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
        except (OSError, json.JSONDecodeError):
            continue
        return [r for r in history if isinstance(r, dict) and "step" in r], str(state.relative_to(run))
    return [], None


def read_vectors(run: Path) -> tuple[dict[str, Any], list[str] | str | None]:
    """The learned IA3 vectors (module name -> float32 numpy array) and the adapter's ``feedforward_modules``."""
    from safetensors import safe_open

    config = json.loads((run / "adapter_config.json").read_text()) if (run / "adapter_config.json").is_file() else {}
    vectors: dict[str, Any] = {}
    with safe_open(str(run / "adapter_model.safetensors"), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
            if ".ia3_l" not in key:
                continue
            module = key.split(".ia3_l")[0].removeprefix("base_model.model.")
            vectors[module] = fh.get_tensor(key).float().reshape(-1).numpy()
    return vectors, config.get("feedforward_modules")


def _recipe_facts(run: Path) -> dict[str, Any]:
    """The recipe's metric and monitor thresholds (the schema's defaults when recipe.yaml is unreadable)."""
    from ia3cli.config.load import load_recipe
    from ia3cli.config.recipe import MonitorSection

    try:
        recipe = load_recipe(run / "recipe.yaml")
    except (Ia3Error, OSError):
        monitor = MonitorSection()
        return {
            "metric": "loss",
            "vanishing_below": monitor.vanishing_below,
            "exploding_above": monitor.exploding_above,
        }
    return {
        "metric": recipe.metric,
        "vanishing_below": recipe.monitor.vanishing_below,
        "exploding_above": recipe.monitor.exploding_above,
    }


# ---- the report data ----------------------------------------------------------------------------------------------


def _series(records: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """``{"step": [...], "value": [...]}`` of one key, one point per step (the last logged, after a resume)."""
    points = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}
    steps = sorted(points)
    return {"step": steps, "value": [float(points[s]) for s in steps]}


def _logged(records: list[dict[str, Any]], key: str) -> bool:
    return any(key in r for r in records)


def _curves(records: list[dict[str, Any]], groups: list[str]) -> dict[str, Any]:
    during = [r for r in records if not r.get("after_training")]
    train = [r for r in during if "loss" in r]
    evals = [r for r in during if any(k.startswith("eval_") for k in r)]
    eval_keys = dict.fromkeys(k for r in evals for k in r if k.startswith("eval_") and not k.endswith(_HIDDEN))
    logged = dict.fromkeys(k.split("_")[-1] for r in train for k in r if k.startswith("ia3/grad_norm_"))
    groups = [g for g in GROUP_ORDER if g in groups or g in logged]
    return {
        "train_loss": _series(train, "loss"),
        "learning_rate": _series(train, "learning_rate"),
        "eval": {k.removeprefix("eval_"): _series(evals, k) for k in eval_keys},
        "grad_norm": {g: _series(train, f"ia3/grad_norm_{g}") for g in groups if _logged(train, f"ia3/grad_norm_{g}")},
        "drift": {g: _series(train, f"ia3/drift_{g}") for g in groups if _logged(train, f"ia3/drift_{g}")},
    }


def _vector_stats(
    vectors: dict[str, Any], feedforward: list[str] | str | None, groups: dict[str, str] | None = None
) -> dict[str, Any]:
    import numpy as np

    by_group: dict[str, list[tuple[str, Any]]] = {}
    for module, values in vectors.items():
        by_group.setdefault(vector_group(module, feedforward, groups), []).append((module, values))
    groups = [g for g in GROUP_ORDER if g in by_group]

    histograms, top = {}, {}
    for g in groups:
        flat = np.concatenate([v for _, v in by_group[g]])
        counts, edges = np.histogram(flat, bins=HIST_BINS)
        up, down = flat[flat > 1], flat[flat < 1]
        histograms[g] = {
            "entries": int(flat.size),
            "counts": counts.tolist(),
            "edges": edges.tolist(),
            "amplified": int(up.size),
            "inhibited": int(down.size),
            "unchanged": int(flat.size - up.size - down.size),
            "mean_amplification": float((up - 1).mean()) if up.size else 0.0,
            "mean_inhibition": float((1 - down).mean()) if down.size else 0.0,
            "min": float(flat.min()),
            "max": float(flat.max()),
        }
        modules = [m for m, v in by_group[g] for _ in range(v.size)]
        index = np.concatenate([np.arange(v.size) for _, v in by_group[g]])
        order = np.argsort(-flat, kind="stable")
        amplified = [i for i in order[:TOP_K] if flat[i] > 1]
        inhibited = [i for i in order[::-1][:TOP_K] if flat[i] < 1]
        top[g] = {
            name: [{"module": modules[i], "index": int(index[i]), "value": float(flat[i])} for i in picked]
            for name, picked in (("amplified", amplified), ("inhibited", inhibited))
        }

    layers = sorted({key for m in vectors if (key := layer_of(m)) is not None})
    cells: dict[tuple[tuple[int, int], str], list[Any]] = {}
    for g in groups:
        for module, values in by_group[g]:
            key = layer_of(module)
            if key is not None:
                cells.setdefault((key, g), []).append(np.abs(values - 1))
    matrix = [
        [float(np.concatenate(cells[(la, g)]).mean()) if (la, g) in cells else None for g in groups] for la in layers
    ]
    heatmap = {"layers": [_layer_label(la) for la in layers], "groups": groups, "values": matrix}
    return {"groups": groups, "histograms": histograms, "heatmap": heatmap, "top": top}


def build(run: str | Path) -> dict[str, Any]:
    """The report data of a run dir: curves, histograms, heatmap, top dimensions, and what is missing.

    Raises:
        Ia3Error: when ``run`` is not a run dir of ``ia3 train`` (no ``run.json`` / ``adapter_config.json``).
    """
    run = Path(run)
    if not run.is_dir() or not any((run / n).is_file() for n in ("run.json", "adapter_config.json")):
        raise Ia3Error(
            f"{run}: not a run dir (no run.json)", "pass the output_dir of `ia3 train`; `ia3 runs` lists them"
        )
    info, metrics, health = (
        read_json_object(run / "run.json"),
        read_json_object(run / "metrics.json"),
        read_json_object(run / "health.json"),
    )
    facts = _recipe_facts(run)
    missing: list[str] = []

    if (run / "adapter_model.safetensors").is_file():
        vectors, feedforward = read_vectors(run)
        stats = _vector_stats(vectors, feedforward, info.get("groups"))
    else:
        stats = {"groups": [], "histograms": {}, "heatmap": {"layers": [], "groups": [], "values": []}, "top": {}}
        missing.append("learned vectors: no adapter_model.safetensors (the run has not finished)")

    records, source = read_history(run)
    curves = _curves(records, stats["groups"])
    if source is None:
        missing.append("training curves, gradient norms and drift: no logs/train_log.jsonl (made by ia3cli >= 0.1)")
    elif source != "logs/train_log.jsonl":
        missing.append(f"logs/train_log.jsonl: curves come from {source} (up to that checkpoint only)")
    if source is not None and not curves["grad_norm"]:
        missing.append(f"gradient norms and drift: no ia3/* values in {source}")
    if source is not None and not curves["eval"]:
        missing.append("evaluation curves: no evaluation during training (data.eval_split / training.eval_strategy)")

    shown = {k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    return {
        "run": str(run),
        "name": run.resolve().name,
        "task": info.get("task"),
        "base_model": info.get("base_model"),
        "quantization": info.get("quantization"),
        "world_size": info.get("world_size"),
        "started": info.get("started"),
        "metric": facts["metric"],
        "final_metrics": {k.removeprefix("eval_"): v for k, v in shown.items() if not k.endswith(_HIDDEN)},
        "steps": metrics.get("global_step", health.get("steps")),
        "health": health.get("status", "unknown"),
        "findings": [f.get("code") for f in health.get("findings", [])],
        "thresholds": {"vanishing_below": facts["vanishing_below"], "exploding_above": facts["exploding_above"]},
        "curves": curves,
        "log_source": source,
        **stats,
        "missing": missing,
    }


def _ours(path: Path) -> bool:
    """Whether ``path`` is a report ia3cli wrote (its PNG metadata or HTML generator tag names ia3cli)."""
    with open(path, "rb") as fh:
        return b"ia3cli" in fh.read(1 << 16) and path.suffix in (".png", ".html")


def write(run: str | Path, out: str | Path | None = None, fmt: str | None = None) -> Path:
    """Build and draw the report of ``run`` into ``out`` (default ``RUN/report.<fmt>``), atomically.

    Args:
        run: The run dir.
        out: Target file; an existing file is replaced only when it is an ia3cli report.
        fmt: ``png`` or ``html`` (default: from ``out``'s suffix, else ``png``).

    Raises:
        Ia3Error: not a run dir, an unknown format, or ``out`` is a file ia3cli did not write.
        RunError: when ``out`` cannot be written.
    """
    run = Path(run)
    fmt = fmt or (Path(out).suffix.lstrip(".").lower() if out is not None else "") or "png"
    if fmt not in ("png", "html"):
        raise Ia3Error(f"--format: '{fmt}' is not a report format", "use png or html")
    target = Path(out) if out is not None else run / f"report.{fmt}"
    if target.is_dir() or (target.exists() and not _ours(target)):
        raise Ia3Error(f"--out: {target} exists and is not an ia3cli report", "choose another --out")
    from ia3cli.report.draw import draw, to_html

    data = build(run)
    png = draw(data)
    payload = png if fmt == "png" else to_html(data, png).encode("utf-8")
    try:
        write_atomic(target, payload)
    except OSError as exc:
        raise RunError(f"{target}: cannot write the report: {exc.strerror or exc}") from None
    return target
