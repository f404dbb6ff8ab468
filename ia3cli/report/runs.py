"""``ia3 runs [DIR]``: the run directories under DIR, one row each, from the files every run dir carries.

A run dir is a folder with ``run.json`` (written when ``ia3 train`` starts); it is *finished* when the adapter
(``adapter_model.safetensors``) and ``metrics.json`` are there too. Nothing is loaded but small JSON/YAML files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ia3cli.errors import Ia3Error
from ia3cli.outputs import read_json_object

COLUMNS = ("name", "task", "base", "metric", "health", "steps", "date", "finished")


def _metric_name(run: Path, task: str | None) -> str:
    """The recipe's metric (``training.metric``, else accuracy for seq-cls and loss otherwise), read without checks."""
    import yaml

    try:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")) or {}
        chosen = (recipe.get("training") or {}).get("metric")
    except (OSError, yaml.YAMLError, AttributeError):
        chosen = None
    return str(chosen).removeprefix("eval_") if chosen else ("accuracy" if task == "seq-cls" else "loss")


def _steps(run: Path, metrics: dict[str, Any], health: dict[str, Any]) -> int | None:
    if isinstance(metrics.get("global_step"), int):
        return metrics["global_step"]
    if isinstance(health.get("steps"), int):
        return health["steps"]
    steps = [int(p.name.rsplit("-", 1)[1]) for p in run.glob("checkpoints/checkpoint-*") if p.name[11:].isdigit()]
    return max(steps, default=None)


def describe(run: Path) -> dict[str, Any]:
    """One row for a run dir: name, task, base, metric (name, value and gain over the step-0 baseline), health,
    steps, date, finished."""
    info, metrics, health = (read_json_object(run / name) for name in ("run.json", "metrics.json", "health.json"))
    task = info.get("task")
    metric = _metric_name(run, task)
    value, base = metrics.get(f"eval_{metric}"), metrics.get(f"baseline_{metric}")
    number = (int, float)
    return {
        "name": run.name,
        "path": str(run),
        "task": task,
        "base": info.get("base_model"),
        "metric": metric,
        "value": value if isinstance(value, number) else None,
        "gain": value - base if isinstance(value, number) and isinstance(base, number) else None,
        "health": health.get("status"),
        "steps": _steps(run, metrics, health),
        "date": info.get("started"),
        "finished": (run / "adapter_model.safetensors").is_file() and (run / "metrics.json").is_file(),
    }


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """The run dirs directly under ``root`` (or ``root`` itself when it is one), newest first.

    Raises:
        Ia3Error: when ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise Ia3Error(f"{root}: no such directory", "pass the folder your recipes' training.output_dir point into")
    candidates = [root] if (root / "run.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
    rows = [describe(p) for p in candidates if (p / "run.json").is_file()]
    return sorted(rows, key=lambda r: r["date"] or "", reverse=True)


def render(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    table = [list(COLUMNS)]
    for r in rows:
        metric = f"{r['metric']} {r['value']:.4f}" if r["value"] is not None else f"{r['metric']} -"
        if r.get("gain") is not None:
            metric += f" ({r['gain']:+.4f} vs step 0)"
        table.append(
            [
                r["name"],
                r["task"] or "?",
                r["base"] or "?",
                metric,
                r["health"] or "-",
                "-" if r["steps"] is None else str(r["steps"]),
                (r["date"] or "?")[:16].replace("T", " "),
                "yes" if r["finished"] else "no",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)
