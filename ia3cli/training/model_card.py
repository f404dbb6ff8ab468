"""The model card (``README.md``) of a run directory: what was trained, how well, and how to load it."""

from __future__ import annotations

from typing import Any

from ia3cli import __version__
from ia3cli.config.recipe import Recipe


def method_summary(recipe: Recipe, plan: Any) -> str:
    a = recipe.adapter
    if a.method == "ia3":
        return f"IA3 on {plan.target_modules} (ff: {plan.feedforward_modules})"
    if a.method == "lora":
        return f"LoRA r={a.lora_r} alpha={a.lora_alpha} on {a.lora_targets}"
    return "full fine-tuning" if a.method == "full" else "classification head only (base frozen)"


def model_card(
    recipe: Recipe,
    plan: Any,
    metrics: dict[str, Any],
    counts: dict[str, int],
    health: dict[str, Any],
    report: str | None = None,
) -> str:
    """A short README for the run directory: what was trained, how well, and how to load it.

    Args:
        report: File name of the run's report image beside the card, shown under the metrics.
    """
    m, d = recipe.model, recipe.data
    auto = {"seq-cls": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}.get(
        m.task, "AutoModelForSeq2SeqLM"
    )
    shown = {
        k: v
        for k, v in metrics.items()
        if (k.startswith("eval_") or k in ("train_loss", "train_runtime")) and not k.endswith(("_runtime", "_second"))
    }
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items())
    extra = f', gguf_file="{m.gguf_file}"' if m.gguf_file else ""
    source = m.path
    figure = (
        f"\n![Training report: curves, gradient norms, drift and the learned vectors]({report})\n" if report else ""
    )
    what = {"ia3": "IA3 adapter", "lora": "LoRA adapter", "full": "Fully fine-tuned", "head": "Linear probe of"}
    if recipe.adapter.method in ("full", "head"):
        return f"""# {what[recipe.adapter.method]} `{m.name}`

Task `{m.task}`, trained with ia3cli {__version__} (`adapter.method: {recipe.adapter.method}`) on `{d.path}`.
Trainable parameters: {counts["trainable"]:,} of {counts["total"]:,}. This folder is a full model:
`{auto}.from_pretrained("{recipe.training.output_dir}")`.

| metric | value |
|---|---|
{rows}
"""
    return f"""---
library_name: peft
base_model: {m.name}
tags: [{recipe.adapter.method}, peft, ia3cli]
---
# {what[recipe.adapter.method]} for `{m.name}`

Task `{m.task}`, trained with ia3cli {__version__} on `{d.path}` (split `{d.train_split}`).
{method_summary(recipe, plan)}.
Trainable parameters: {counts["trainable"]:,} ({counts["ia3"]:,} IA3 vector entries) of {counts["total"]:,}.
Health: {health.get("status", "unknown")}.

| metric | value |
|---|---|
{rows}
{figure}
## Load it

```python
from peft import PeftModel
from transformers import {auto}

base = {auto}.from_pretrained("{source}"{extra})
model = PeftModel.from_pretrained(base, "{recipe.training.output_dir}")
```

`recipe.yaml` beside this file is the exact recipe (overrides applied); `ia3 eval` and `ia3 merge` read it.
"""
