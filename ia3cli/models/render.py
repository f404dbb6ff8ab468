"""The human output of ``ia3 inspect-modules``: a target plan as a table of module patterns, then the specs, the
cost and the notes. Plain text, no torch import."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ia3cli.models.targets import TargetPlan


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render_plan(plan: TargetPlan, width: int = 100) -> str:
    """The human output of ``ia3 inspect-modules`` (plain text, fits ``width`` columns).

    Args:
        plan: A plan from ``targets.recommend`` or ``targets.resolve``.
        width: Line width to wrap notes and warnings at.
    """
    how = {"family": "family table", "shape-analysis": "shape analysis", "explicit": "recipe's explicit targets"}
    head = f"{plan.model_type} ({plan.task})  hidden {plan.hidden_size}  intermediate {plan.intermediate_size}"
    lines = [head, f"targets chosen by: {how.get(plan.method, plan.method)}", ""]
    pat_w = min(max([len("pattern")] + [len(r["pattern"]) for r in plan.modules]), 46)
    lines.append(f"{'pattern':<{pat_w}} {'n':>4} {'in':>6} {'out':>6} {'kind':<8} {'role':<14} IA3 scales")
    for r in plan.modules:
        pattern = r["pattern"] if len(r["pattern"]) <= pat_w else "..." + r["pattern"][-(pat_w - 3) :]
        mark = ""
        if r["targeted"]:
            mark = "ff:in" if r["feedforward"] else "out"
            if r["targeted_count"] != r["count"]:
                mark += f" {r['targeted_count']}/{r['count']}"
        lines.append(
            f"{pattern:<{pat_w}} {r['count']:>4} {r['in_features']:>6} {r['out_features']:>6} {r['kind'][:8]:<8} "
            f"{r['role']:<14} {mark}".rstrip()
        )
    lines += [
        "",
        f"target_modules:      {plan.target_modules!r}",
        f"feedforward_modules: {plan.feedforward_modules!r}",
    ]
    if plan.peft_default is not None:
        lines.append(
            f"PEFT default:        {plan.peft_default['target_modules']!r}, "
            f"feed-forward {plan.peft_default['feedforward_modules']!r}"
        )
    else:
        lines.append("PEFT default:        none for this model type")
    ratio = f" ({plan.lora_r8_params / plan.ia3_params:.0f}x IA3)" if plan.ia3_params else ""
    lines += [
        f"IA3 parameters:      {plan.ia3_params:,} in {len(plan.targeted_names)} modules",
        f"LoRA r=8, same:      {plan.lora_r8_params:,}{ratio}",
        f"adapter file:        ~{_size(plan.adapter_bytes_fp32)} fp32, ~{_size(plan.adapter_bytes_fp16)} fp16",
    ]
    for title, items in (("notes", plan.notes), ("warnings", plan.warnings)):
        if items:
            lines += ["", f"{title}:"]
            for item in items:
                lines += textwrap.wrap(item, width, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines)
