"""What a run trains besides IA3: LoRA, full fine-tuning, or the classification head alone (``adapter.method``).

IA3 is the default and lives in :mod:`ia3cli.models.loading`. The other methods exist so that ``ia3 compare`` can put
IA3 next to its alternatives with one training loop, one data pipeline and one evaluation:

- ``lora``: PEFT ``LoraConfig`` of rank ``adapter.lora_r``. Its targets come from the same module table (with
  roles) that IA3's targets do: ``attention`` picks the query and value projections (the LoRA paper's W_q and W_v;
  a fused QKV module where keys and values are fused), ``all-linear`` every linear layer of the blocks.
- ``full``: no adapter; every parameter trains and the run saves a full model.
- ``head``: ``seq-cls`` only; the base is frozen and only the new classification head trains (a linear probe).

Torch and PEFT are imported inside the functions.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ia3cli.errors import RecipeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ia3cli.config.recipe import Recipe
    from ia3cli.models.targets import TargetPlan

_NOT_LINEAR = ("Conv2d", "Conv3d")
_ATTENTION_ROLES = ("attn_q", "attn_v")


def _regex(patterns: list[str]) -> str:
    """One regex over full module names from table patterns (layer index written as ``*``)."""
    parts = [re.escape(p).replace(r"\*", r"\d+") for p in dict.fromkeys(patterns)]
    return "(?:" + "|".join(parts) + ")"


def lora_target_rows(plan: TargetPlan, spec: str | list[str]) -> list[dict]:
    """Rows of the plan's module table that LoRA targets for ``adapter.lora_targets``.

    Raises:
        RecipeError: on ``adapter.lora_targets`` when the choice selects no module.
    """
    rows = [r for r in plan.modules if r["kind"] not in _NOT_LINEAR and r["role"] != "head"]
    if spec == "all-linear":
        picked = [r for r in rows if "*" in r["pattern"].split(".")]
    elif spec == "attention":
        picked = [r for r in rows if r["role"] in _ATTENTION_ROLES]
        if not picked:  # keys and values fused into one module (GPT-2, Falcon, ...)
            picked = [r for r in rows if r["role"] == "attn_qkv_fused"]
    else:
        picked = [r for r in rows if any(r["pattern"] == e or r["pattern"].endswith("." + e) for e in spec)]
    if not picked:
        raise RecipeError(
            "adapter.lora_targets",
            f"selects no linear module of this '{plan.model_type}' model",
            "`ia3 inspect-modules MODEL` lists the modules and their roles; pass a list of suffixes",
        )
    return picked


def lora_config(recipe: Recipe, plan: TargetPlan) -> Any:
    """The ``peft.LoraConfig`` for a recipe: rank, alpha, targets from the module table, the head in full."""
    from peft import LoraConfig

    from ia3cli.config.families import TASKS

    a = recipe.adapter
    rows = lora_target_rows(plan, a.lora_targets)
    return LoraConfig(
        task_type=TASKS[recipe.model.task].peft_task_type,
        r=a.lora_r,
        lora_alpha=a.lora_alpha,
        target_modules=_regex([r["pattern"] for r in rows]),
        modules_to_save=plan.modules_to_save,
        fan_in_fan_out=any(r["kind"] == "Conv1D" for r in rows),
    )


def freeze_all_but_head(model: PreTrainedModel, plan: TargetPlan) -> PreTrainedModel:
    """Make only the classification head trainable (``method: head``).

    Raises:
        RecipeError: when the model has no separate head module (``adapter.method``).
    """
    roots = plan.head_modules
    if not roots:
        raise RecipeError("adapter.method", "'head' found no classification head module in this model")
    for name, param in model.named_parameters():
        param.requires_grad = any(name == r or name.startswith(r + ".") for r in roots)
    return model


def unfreeze_all(model: PreTrainedModel) -> PreTrainedModel:
    """Make every parameter trainable (``method: full``)."""
    for param in model.parameters():
        param.requires_grad = True
    return model


def wrap(base: PreTrainedModel, recipe: Recipe, plan: TargetPlan) -> Any:
    """Apply a non-IA3 ``adapter.method`` to ``base`` (LoRA through PEFT, or plain parameter freezing)."""
    method = recipe.adapter.method
    if method == "lora":
        from peft import get_peft_model

        return get_peft_model(base, lora_config(recipe, plan))
    if method == "head":
        return freeze_all_but_head(base, plan)
    return unfreeze_all(base)
