"""Turning ``ia3 compare`` cells into a terminal table, a plot and a one-line recommendation (no torch here).

A cell is a dict with at least ``method``, ``n``, ``metric`` (the compared value), ``params`` (trainable),
``bytes`` (what the method stores per task), ``seconds`` and ``peak_rss_mib``. ``zero-shot`` has one cell that
stands for every N.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ia3cli.outputs import human_bytes, write_atomic

TOLERANCE = 0.01  # "as good as": within this much of the best mean (or the best's standard error, if larger)


def values(cells: Sequence[dict[str, Any]], method: str, n: int) -> list[float]:
    """The metric of every finished cell of ``method`` at N (zero-shot's single cell counts for every N)."""
    return [
        c["metric"]
        for c in cells
        if c["method"] == method and (c["n"] == n or method == "zero-shot") and c.get("metric") is not None
    ]


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _first(cells: Sequence[dict[str, Any]], method: str, key: str) -> Any:
    return next((c.get(key) for c in cells if c["method"] == method and c.get(key) is not None), None)


def table(cells: Sequence[dict[str, Any]], methods: Sequence[str], rows: Sequence[int], metric: str) -> str:
    """Methods x N (mean ± std over seeds), then trainable parameters, stored bytes, seconds per cell, peak RSS."""
    header = ["method", *(f"N={n}" for n in rows), "trainable", "stored", "s/cell", "peak RSS"]
    lines = [header]
    for method in methods:
        line = [method]
        for n in rows:
            xs = values(cells, method, n)
            line.append("-" if not xs else "{:.3f} ± {:.3f}".format(*mean_std(xs)))
        mine = [c for c in cells if c["method"] == method]
        params = _first(cells, method, "params")
        line.append(f"{params:,}" if params is not None else "-")
        line.append(human_bytes(_first(cells, method, "bytes")))
        line.append(f"{statistics.fmean(c['seconds'] for c in mine):.0f}" if mine else "-")
        line.append(f"{max(c['peak_rss_mib'] for c in mine):,.0f} MiB" if mine else "-")
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(_pad(cell, w, i) for i, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in lines]
    text.insert(1, "-" * len(text[0]))
    return f"{metric} on the evaluation rows, mean ± std over seeds\n" + "\n".join(text)


def _pad(cell: str, width: int, column: int) -> str:
    return cell.ljust(width) if column == 0 else cell.rjust(width)


def recommendation(
    cells: Sequence[dict[str, Any]], methods: Sequence[str], rows: Sequence[int], higher_is_better: bool = True
) -> str:
    """One line from the numbers at the largest N: the cheapest method (fewest stored bytes) whose mean is within
    :data:`TOLERANCE` (or the standard error of the best method's mean over seeds, if larger) of the best mean."""
    n = rows[-1] if rows else 0
    stats = {m: mean_std(values(cells, m, n)) for m in methods if values(cells, m, n)}
    if not stats:
        return "no finished cells yet"
    sign = 1 if higher_is_better else -1
    best = max(stats, key=lambda m: sign * stats[m][0])
    tol = max(TOLERANCE, stats[best][1] / len(values(cells, best, n)) ** 0.5)
    close = [m for m in stats if sign * (stats[best][0] - stats[m][0]) <= tol]
    order = {m: i for i, m in enumerate(methods)}
    pick = min(close, key=lambda m: (_first(cells, m, "bytes") or 0, order[m]))
    mean = f"{stats[best][0]:.3f}"
    if pick == best:
        others = sorted((m for m in stats if m != best), key=lambda m: -sign * stats[m][0])
        runner = f"; next {others[0]} {stats[others[0]][0]:.3f}" if others else ""
        return f"At N={n} {best} is best ({mean}{runner}): {best}."
    gap = abs(stats[best][0] - stats[pick][0])
    b_best, b_pick = _first(cells, best, "bytes") or 0, _first(cells, pick, "bytes") or 0
    cost = "with nothing trained or stored" if b_pick == 0 else f"with a {b_best / b_pick:.0f}x smaller adapter"
    return f"At N={n} {pick} ({stats[pick][0]:.3f}) is within {gap:.3f} of {best} ({mean}) {cost}: {pick}."


def plot(
    cells: Sequence[dict[str, Any]],
    methods: Sequence[str],
    rows: Sequence[int],
    metric: str,
    path: Path,
    title: str = "",
) -> Path:
    """``compare.png``: the metric against N per method (mean, error bars = std over seeds), log-x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in methods:
        ns = [n for n in rows if values(cells, method, n)]
        if not ns:
            continue
        stats = [mean_std(values(cells, method, n)) for n in ns]
        style = {"ls": "--", "marker": None} if method == "zero-shot" else {"marker": "o"}
        ax.errorbar(ns, [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3, label=method, **style)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(rows), [str(n) for n in rows])
    ax.set_xlabel("training rows N")
    ax.set_ylabel(f"{metric} (evaluation rows)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path
