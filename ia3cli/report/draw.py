"""Drawing of ``ia3 report``: the data of :func:`ia3cli.report.build.build` as one PNG figure or one HTML page.

Nothing here reads a run dir; every number drawn comes from the report data, which the tests check. Layout: loss,
evaluation metrics and learning rate over steps; per-group gradient norm (with the monitor's thresholds), drift and
a layer x group heatmap; one histogram per group of learned vectors; the top amplified/inhibited dimensions.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from ia3cli import __version__

MARKER = f"ia3cli {__version__} report"
"""Written into every PNG (metadata) and HTML page (generator tag): only such a file is ever replaced."""

GROUP_COLORS = {"q": "#9467bd", "k": "#1f77b4", "v": "#ff7f0e", "qkv": "#8c564b", "ff": "#2ca02c", "other": "#7f7f7f"}
STEP_AXIS = "optimiser step"


def _empty(ax: Any, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, f"not available:\n{why}", ha="center", va="center", wrap=True, color="#666666", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _references(ax: Any, data: dict[str, Any], majority: bool = False) -> None:
    """The step-0 baseline of the recipe's metric (dashed) and, for accuracies, the majority-class rate (dotted)."""
    if data.get("baseline") is not None:
        label = f"baseline {data['metric']} (step 0) {data['baseline']:.3f}"
        ax.axhline(data["baseline"], ls="--", lw=1.2, color="#444444", label=label)
    if majority and data.get("majority") is not None:
        ax.axhline(data["majority"], ls=":", lw=1.2, color="#7f7f7f", label=f"majority class {data['majority']:.3f}")


def _draw_curves(fig: Any, spec: Any, data: dict[str, Any]) -> None:
    curves, why = data["curves"], "no training log" if data["log_source"] is None else "nothing logged"
    ax = fig.add_subplot(spec[0, 0])
    if curves["train_loss"]["step"] or "loss" in curves["eval"]:
        if curves["train_loss"]["step"]:
            ax.plot(curves["train_loss"]["step"], curves["train_loss"]["value"], label="train", color="#1f77b4")
        if "loss" in curves["eval"]:
            ax.plot(
                curves["eval"]["loss"]["step"], curves["eval"]["loss"]["value"], "o-", label="eval", color="#d62728"
            )
        if data["metric"] == "loss":
            _references(ax, data)
        ax.set(title="Loss", xlabel=STEP_AXIS, ylabel="loss (cross-entropy, nats)")
        ax.legend()
    else:
        _empty(ax, "Loss", why)

    ax = fig.add_subplot(spec[0, 1])
    shown = {k: v for k, v in curves["eval"].items() if k != "loss" and v["step"]}
    if shown:
        for name, series in shown.items():
            ax.plot(series["step"], series["value"], "o-", label=name)
        best = shown.get(data["metric"])
        if best:
            pick = max if data["metric"] != "loss" else min
            trained = [i for i, step in enumerate(best["step"]) if step > 0] or list(range(len(best["step"])))
            i = pick(trained, key=lambda j: best["value"][j])  # the step-0 baseline is no checkpoint to pick
            ax.plot(
                best["step"][i], best["value"][i], "*", ms=16, color="gold", mec="black", label=f"best {data['metric']}"
            )
        _references(ax, data, majority=True)
        ax.set(title="Evaluation metrics", xlabel=STEP_AXIS, ylabel="metric value (fraction)")
        ax.legend()
    else:
        _empty(ax, "Evaluation metrics", "no evaluation during training" if data["log_source"] else why)

    ax = fig.add_subplot(spec[0, 2])
    if curves["learning_rate"]["step"]:
        ax.plot(curves["learning_rate"]["step"], curves["learning_rate"]["value"], color="#555555")
        ax.set(title="Learning rate", xlabel=STEP_AXIS, ylabel="learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    else:
        _empty(ax, "Learning rate", why)


def _draw_health(fig: Any, spec: Any, data: dict[str, Any]) -> None:
    curves, th = data["curves"], data["thresholds"]
    why = "no ia3/* values logged" if data["log_source"] else "no training log"
    ax = fig.add_subplot(spec[1, 0])
    if curves["grad_norm"]:
        for g, series in curves["grad_norm"].items():
            ax.plot(series["step"], [max(v, 1e-12) for v in series["value"]], label=g, color=GROUP_COLORS[g])
        ax.axhline(th["vanishing_below"], ls="--", color="#999999", lw=1)
        ax.axhline(th["exploding_above"], ls="--", color="#d62728", lw=1)
        ax.text(
            0.01,
            th["vanishing_below"],
            f" vanishing < {th['vanishing_below']:g}",
            transform=ax.get_yaxis_transform(),
            va="bottom",
            fontsize=8,
            color="#666666",
        )
        ax.text(
            0.01,
            th["exploding_above"],
            f" exploding > {th['exploding_above']:g}",
            transform=ax.get_yaxis_transform(),
            va="bottom",
            fontsize=8,
            color="#d62728",
        )
        ax.set_yscale("log")
        ax.set(title="Gradient norm per group (pre-clip)", xlabel=STEP_AXIS, ylabel="L2 norm of the gradient")
        ax.legend(loc="upper right")
    else:
        _empty(ax, "Gradient norm per group", why)

    ax = fig.add_subplot(spec[1, 1])
    if curves["drift"]:
        for g, series in curves["drift"].items():
            ax.plot(series["step"], series["value"], label=g, color=GROUP_COLORS[g])
        ax.set(title="Drift from initialisation", xlabel=STEP_AXIS, ylabel="mean |l - 1| (scale units)")
        ax.legend(loc="upper left")
    else:
        _empty(ax, "Drift from initialisation", why)

    ax = fig.add_subplot(spec[1, 2])
    heat = data["heatmap"]
    if heat["layers"] and heat["groups"]:
        import numpy as np

        values = np.array([[np.nan if v is None else v for v in row] for row in heat["values"]], dtype=float)
        image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(heat["groups"])), heat["groups"])
        step = max(1, len(heat["layers"]) // 16)
        ax.set_yticks(range(0, len(heat["layers"]), step), heat["layers"][::step])
        ax.set(title="Mean |l - 1| per layer and group", xlabel="group", ylabel="layer")
        if values.size <= 48:
            for (r, c), v in np.ndenumerate(values):
                if not np.isnan(v):
                    dark = v < np.nanmin(values) + 0.6 * (np.nanmax(values) - np.nanmin(values))
                    ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
        fig.colorbar(image, ax=ax, label="mean |l - 1| (scale units)")
    else:
        _empty(ax, "Mean |l - 1| per layer and group", "no learned vectors")


def _draw_vectors(fig: Any, spec: Any, data: dict[str, Any]) -> None:
    groups = data["groups"]
    if not groups:
        _empty(fig.add_subplot(spec[2, :]), "Learned vectors", "no adapter_model.safetensors")
        return
    sub = spec[2, :].subgridspec(1, len(groups), wspace=0.15)
    for i, g in enumerate(groups):
        h = data["histograms"][g]
        ax = fig.add_subplot(sub[0, i])
        edges = h["edges"]
        ax.stairs(h["counts"], edges, fill=True, color=GROUP_COLORS[g], alpha=0.8)
        ax.axvline(1.0, color="black", lw=1, ls="--")
        up = f"{h['amplified']:,} amplified (mean +{h['mean_amplification']:.3f})"
        down = f"{h['inhibited']:,} inhibited (mean -{h['mean_inhibition']:.3f})"
        ax.set_title(
            f"'{g}' vectors ({h['entries']:,} dims)\n{up}, {down}",
            fontsize=10,
        )
        ax.set(
            xlabel="learned scale l (1 = unchanged)",
            ylabel="dimensions (count)" if i == 0 else None,
        )


def _top_text(data: dict[str, Any]) -> str:
    lines = []
    for g in data["groups"]:
        for name in ("amplified", "inhibited"):
            dims = data["top"][g][name]
            shown = ", ".join(f"{d['module']}[{d['index']}] {d['value']:.3f}" for d in dims[:3]) or "none"
            lines.append(f"{g:>5} {name:<9}  {shown}")
    return "\n".join(lines)


def draw(data: dict[str, Any], dpi: int = 72) -> bytes:
    """The report figure as PNG bytes (matplotlib, Agg backend)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 15), layout="constrained")
    spec = fig.add_gridspec(4, 3, height_ratios=[1, 1, 0.9, 0.45])
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in data["final_metrics"].items()) or "no final metrics"
    if data.get("baseline") is not None:
        metrics += f" (step 0: {data['metric']} {data['baseline']:.4f})"
    if data.get("majority") is not None:
        metrics += f" | majority class {data['majority']:.4f}"
    quant = f", {data['quantization']}" if data.get("quantization") not in (None, "none") else ""
    fig.suptitle(
        f"{data['name']}: IA3 on {data['base_model'] or '?'} ({data['task'] or '?'}{quant})\n"
        f"{data['steps'] if data['steps'] is not None else '?'} steps | {metrics} | health {data['health']}",
        fontsize=13,
    )
    _draw_curves(fig, spec, data)
    _draw_health(fig, spec, data)
    _draw_vectors(fig, spec, data)
    ax = fig.add_subplot(spec[3, :])
    ax.axis("off")
    ax.set_title("Most amplified and inhibited dimensions per group (module[index] value)", loc="left")
    text = _top_text(data) or "not available: no learned vectors"
    if data["missing"]:
        text += "\n\nnot shown: " + "\n           ".join(data["missing"])
    ax.text(0, 1, text, va="top", ha="left", family="monospace", fontsize=9, transform=ax.transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": MARKER})
    return buf.getvalue()


def _fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


def to_html(data: dict[str, Any], png: bytes) -> str:
    """One self-contained page: the figure as an embedded PNG, the final metrics and the top-dimension tables."""
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>" for k, v in data["final_metrics"].items())
    facts = [
        ("task", data["task"]),
        ("base model", data["base_model"]),
        ("quantization", data["quantization"]),
        ("steps", data["steps"]),
        ("health", data["health"]),
        ("started", data["started"]),
        (f"baseline {data['metric']} (step 0)", _fmt(data.get("baseline"))),
        ("majority class", _fmt(data.get("majority"))),
    ]
    fact_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in facts if v is not None)
    tables = []
    for g in data["groups"]:
        for name in ("amplified", "inhibited"):
            body = (
                "".join(
                    f"<tr><td><code>{esc(d['module'])}</code></td><td>{d['index']}</td><td>{d['value']:.4f}</td></tr>"
                    for d in data["top"][g][name]
                )
                or "<tr><td colspan=3>none</td></tr>"
            )
            tables.append(
                f"<h3>'{esc(g)}' most {name}</h3><table><tr><th>module</th><th>index</th>"
                f"<th>value</th></tr>{body}</table>"
            )
    missing = "".join(f"<li>{esc(m)}</li>" for m in data["missing"])
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{esc(MARKER)}">
<title>ia3 report: {esc(data["name"])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>Run <code>{esc(data["name"])}</code></h1>
<table>{fact_rows}</table>
<h2>Final metrics</h2><table>{rows or "<tr><td>none</td></tr>"}</table>
{f"<h2>Not shown</h2><ul>{missing}</ul>" if missing else ""}
<h2>Figure</h2><img alt="training report of {esc(data["name"])}" src="data:image/png;base64,{image}">
<h2>Most amplified and inhibited dimensions</h2>{"".join(tables) or "<p>no learned vectors</p>"}
</body></html>
"""
