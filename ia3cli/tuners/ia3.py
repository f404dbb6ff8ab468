"""IA3 through PEFT: the ``IA3Config`` of a recipe, wrapping a base, starting from an earlier run's vectors
(``adapter.init_from``), and loading a run's adapter back.

The base itself (config, tokenizer, full/4-bit/8-bit/GGUF weights) comes from :mod:`ia3cli.models.loading`; the
modules IA3 scales come from the target plan (:mod:`ia3cli.models.targets`). Other methods (``adapter.method``:
LoRA, full, head) are in :mod:`ia3cli.tuners.baselines`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia3cli.config.recipe import Recipe
from ia3cli.errors import RecipeError
from ia3cli.models import sharding
from ia3cli.models.loading import PEFT_TASK_TYPES, load_config, load_recipe_base, load_tokenizer, with_pad_token
from ia3cli.tuners import baselines

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ia3cli.models.targets import TargetPlan


def ia3_config(recipe: Recipe, plan: TargetPlan) -> Any:
    """The ``peft.IA3Config`` for a recipe and its resolved targets."""
    from peft import IA3Config

    return IA3Config(
        task_type=PEFT_TASK_TYPES[recipe.model.task],
        target_modules=plan.target_modules,
        feedforward_modules=plan.feedforward_modules,
        modules_to_save=plan.modules_to_save,
        init_ia3_weights=recipe.adapter.init_ia3_weights,
        fan_in_fan_out=plan.fan_in_fan_out,
    )


def wrap(base: PreTrainedModel, recipe: Recipe, plan: TargetPlan) -> PeftModel:
    """Wrap ``base`` with IA3, or with ``adapter.method`` (see :mod:`ia3cli.tuners.baselines`).

    Quantised bases are first prepared for k-bit training (norms in fp32, input grads).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=recipe.training.gradient_checkpointing)
        keep_4bit_layout(base)
    elif recipe.training.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if recipe.adapter.method != "ia3":
        return baselines.wrap(base, recipe, plan)
    return get_peft_model(base, ia3_config(recipe, plan))


def keep_4bit_layout(base: PreTrainedModel) -> None:
    """Keep bitsandbytes from repacking a trained model's 4-bit weights for CPU inference.

    bitsandbytes 0.50 (``Linear4bit.forward``) repacks a layer's weight into a CPU inference layout the first time the
    layer runs in eval mode without gradients (any evaluation, the step-0 one included) and keeps that layout; its
    kernel (``gemv_4bit``) has no backward, so from then on no gradient crosses the layer and the adapter silently
    stops learning. A model being trained keeps the plain layout (evaluation is then slower on CPU, and correct).
    """
    for module in base.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def build(recipe: Recipe, plan: TargetPlan) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Tokenizer plus the base model wrapped for ``adapter.method`` (IA3 by default); the base is sharded across
    the ranks with ``training.distributed: fsdp``: while it loads, or a 4-bit one once wrapped (see
    :mod:`ia3cli.models.sharding`)."""
    tokenizer = load_tokenizer(recipe.model)
    if sharding.sharded_after_wrap(recipe):
        base = load_recipe_base(recipe, tokenizer, device="cpu", quant_storage=sharding.quant_storage(recipe))
        model = wrap(base, recipe, plan)
        sharding.shard_wrapped(model, recipe)
        return model, tokenizer
    shards = sharding.distributed_config(recipe, load_config(recipe.model))
    return wrap(load_recipe_base(recipe, tokenizer, distributed_config=shards), recipe, plan), tokenizer


def load_run_tokenizer(run_dir: str | Path, recipe: Recipe) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a run dir (with a pad token), else the base's."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    if (run_dir / "tokenizer_config.json").exists():
        return with_pad_token(AutoTokenizer.from_pretrained(run_dir))
    return load_tokenizer(recipe.model)


def load_run_model(
    run_dir: str | Path, recipe: Recipe, *, is_trainable: bool = False, device: str | None = None
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Rebuild the base as ``recipe`` says (the run's, or a copy with another ``model`` section) on ``device`` and
    load the run's adapter; the tokenizer saved in the run dir is preferred over the base's."""
    from peft import PeftModel

    tokenizer = load_run_tokenizer(run_dir, recipe)
    base = load_recipe_base(recipe, tokenizer, device)
    model = PeftModel.from_pretrained(base, str(run_dir), is_trainable=is_trainable)
    return model, tokenizer


def load_init_vectors(model: Any, run_dir: str) -> int:
    """Copy the IA3 vectors (and any saved head) of an earlier run into ``model``; returns the tensors loaded.

    Raises:
        RecipeError: (``adapter.init_from``) when the run's adapter does not fit the model: other targets, other
            shapes, or a missing file.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(run_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise RecipeError("adapter.init_from", f"{run_dir} has no adapter_model.safetensors", "point it at a run dir")
    saved = load_file(str(path))
    expected = {n.replace(".default", "") for n, p in model.named_parameters() if ".ia3_l." in n}
    present = {k for k in saved if k.endswith("ia3_l")}
    own_shapes = {n.replace(".default", ""): p.shape for n, p in model.named_parameters() if ".ia3_l." in n}
    if present != expected or any(saved[k].shape != own_shapes[k] for k in present):
        missing, extra = sorted(expected - present), sorted(present - expected)
        detail = f"missing {missing[0]}" if missing else (f"unexpected {extra[0]}" if extra else "other shapes")
        raise RecipeError(
            "adapter.init_from",
            f"the IA3 vectors in {run_dir} target other modules than this recipe ({detail})",
            "use the same adapter.target_modules / feedforward_modules as that run",
        )
    set_peft_model_state_dict(model, saved)
    return len(saved)
