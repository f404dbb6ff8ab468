"""Tokenizer and base model (full precision, 4-bit or 8-bit), wrapped with IA3 through PEFT.

Every way a model is named (hub id, local folder, ``pkg:`` folder inside an installed package, a GGUF file) goes
through :func:`load_tokenizer` and :func:`load_base`, so tests that load a tiny model from a temp dir exercise the
same code a hub id takes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia3cli.errors import Ia3Error, RecipeError
from ia3cli.recipe import ModelSection, Recipe, resolve_model_path

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ia3cli.targets import TargetPlan

PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}
# Classification heads are trained in full (modules_to_save), so they must not be quantised.
HEAD_MODULES = ["classifier", "pre_classifier", "score", "classification_head", "lm_head"]


def auto_class(task: str) -> Any:
    """The ``transformers`` auto class that builds a model for ``task``.

    Raises:
        RecipeError: for an unknown task.
    """
    import transformers

    if task not in PEFT_TASK_TYPES:
        raise RecipeError("model.task", f"'{task}' is not a task", f"use one of {', '.join(PEFT_TASK_TYPES)}")
    return {
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }[task]


def torch_dtype(name: str) -> torch.dtype | str:
    """Map a recipe dtype name to a ``torch.dtype`` (``auto`` passes through)."""
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _source_kwargs(model: ModelSection) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.revision:
        kwargs["revision"] = model.revision
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    return kwargs


def load_tokenizer(model: ModelSection) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``model`` and give it a pad token when it has none (the EOS token, or UNK).

    Raises:
        RecipeError: when the tokenizer cannot be found or loaded.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(model.name)
    try:
        tok = AutoTokenizer.from_pretrained(path, **_source_kwargs(model))
    except (OSError, ValueError) as exc:
        raise RecipeError("model.name", f"cannot load a tokenizer from '{model.name}': {_first_line(exc)}") from None
    return _with_pad_token(tok)


def _with_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # batches are padded dynamically, so every tokenizer needs a pad token; decoder-only ones often lack it
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def quantization_config(model: ModelSection, quantization: str | None = None) -> Any:
    """The ``BitsAndBytesConfig`` for the recipe's (or the given) quantization, or ``None`` for full precision."""
    quantization = quantization or model.quantization
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEAD_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=HEAD_MODULES,
        bnb_4bit_quant_type=model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(model.bnb_4bit_compute_dtype),
    )


def load_base(
    model: ModelSection,
    num_labels: int = 2,
    *,
    quantization: str | None = None,
    dtype: str | None = None,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """Load the base model for ``model.task``.

    Args:
        model: The recipe's model section.
        num_labels: Classes for ``seq-cls``.
        quantization: Override ``model.quantization`` (``merge`` reloads 4-bit runs with ``"none"``).
        dtype: Override ``model.dtype``.
        label_names: id -> name for the classification head's config.
        pad_token_id: Set on the config (decoder-only classifiers need it to find the last token).

    Raises:
        RecipeError: when the model cannot be found or loaded.
        Ia3Error: when bitsandbytes is needed but missing.
    """
    path = resolve_model_path(model.name)
    kwargs = _source_kwargs(model)
    quant = quantization_config(model, quantization)
    if quant is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise Ia3Error(
                f"model.quantization={model.quantization} needs bitsandbytes", "pip install bitsandbytes"
            ) from None
        kwargs["quantization_config"] = quant
    kwargs["dtype"] = torch_dtype(dtype or model.dtype)
    if model.task == "seq-cls":
        kwargs["num_labels"] = num_labels
        if label_names:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if model.gguf_file:
        # A model loaded straight from GGUF refuses training and bitsandbytes needs full-precision tensors:
        # dequantise the GGUF once into a cached safetensors folder and load that.
        path = str(dequantized_gguf(model))
        kwargs.pop("gguf_file")
    try:
        base = auto_class(model.task).from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise RecipeError(
            "model.name", f"cannot load '{model.name}' for task {model.task}: {_first_line(exc)}"
        ) from None
    if pad_token_id is not None and getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = pad_token_id
    return base


def cache_dir() -> Path:
    """Where ia3cli caches derived files (``$IA3CLI_CACHE``, default ``~/.cache/ia3cli``)."""
    return Path(os.environ.get("IA3CLI_CACHE", Path.home() / ".cache" / "ia3cli"))


def dequantized_gguf(model: ModelSection) -> Path:
    """A GGUF checkpoint dequantised to float32 safetensors, converted on first use and cached by file identity."""
    src = Path(resolve_model_path(model.name)) / model.gguf_file  # type: ignore[operator]
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{model.task}".encode()).hexdigest()[:16]
    dest = cache_dir() / "gguf" / f"{src.stem}-{key}"
    if (dest / "config.json").is_file():
        return dest
    full = auto_class(model.task).from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch_dtype("float32"), trust_remote_code=model.trust_remote_code
    )
    # The weights are plain float32 now; drop the GGUF quantiser record so the folder saves and loads as-is.
    full.hf_quantizer = None
    if hasattr(full.config, "quantization_config"):
        del full.config.quantization_config
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    full.save_pretrained(str(tmp))
    tmp.replace(dest) if not dest.exists() else shutil.rmtree(tmp)
    return dest


def ia3_config(recipe: Recipe, plan: TargetPlan) -> Any:
    """The ``peft.IA3Config`` for a recipe and its resolved targets."""
    from peft import IA3Config

    return IA3Config(
        task_type=PEFT_TASK_TYPES[recipe.model.task],
        target_modules=plan.target_modules,
        feedforward_modules=plan.feedforward_modules,
        modules_to_save=modules_to_save(recipe, plan),
        init_ia3_weights=recipe.adapter.init_ia3_weights,
        fan_in_fan_out=plan.fan_in_fan_out,
    )


def modules_to_save(recipe: Recipe, plan: TargetPlan) -> list[str] | None:
    """The recipe's extra trainable modules plus, for seq-cls, every newly initialised head module.

    PEFT adds only ``classifier``/``score`` by itself; DistilBERT's ``pre_classifier`` or BART's
    ``classification_head`` would otherwise stay frozen at their random initialisation.
    """
    names = list(recipe.adapter.modules_to_save or [])
    if recipe.model.task == "seq-cls":
        names += [h for h in plan.head_modules if h not in names]
    return names or None


def wrap(base: PreTrainedModel, recipe: Recipe, plan: TargetPlan) -> PeftModel:
    """Wrap ``base`` with IA3, or with ``adapter.method`` (see :mod:`ia3cli.methods`).

    Quantised bases are first prepared for k-bit training (norms in fp32, input grads).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    from ia3cli import methods

    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=recipe.training.gradient_checkpointing)
    elif recipe.training.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if recipe.adapter.method != "ia3":
        return methods.wrap(base, recipe, plan)
    return get_peft_model(base, ia3_config(recipe, plan))


def load_recipe_base(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, *, quantization: str | None = None
) -> PreTrainedModel:
    """The base model as training builds it for ``recipe``: head sized and labelled, pad id from ``tokenizer``."""
    return load_base(
        recipe.model,
        recipe.num_labels,
        quantization=quantization,
        label_names=recipe.data.label_names,
        pad_token_id=tokenizer.pad_token_id,
    )


def build(recipe: Recipe, plan: TargetPlan) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Tokenizer plus the base model wrapped for ``adapter.method`` (IA3 by default)."""
    tokenizer = load_tokenizer(recipe.model)
    return wrap(load_recipe_base(recipe, tokenizer), recipe, plan), tokenizer


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable, total and IA3-vector parameter counts (4-bit weights counted as stored elements x2)."""
    trainable = total = ia3 = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
            if ".ia3_l." in name:
                ia3 += n
    return {"trainable": trainable, "total": total, "ia3": ia3, "other_trainable": trainable - ia3}


def load_run_model(
    run_dir: str | Path, recipe: Recipe, *, quantization: str | None = None, is_trainable: bool = False
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Rebuild the base as in training (or with ``quantization`` overridden) and load the run's adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    if (run_dir / "tokenizer_config.json").exists():
        tokenizer = _with_pad_token(AutoTokenizer.from_pretrained(run_dir))
    else:
        tokenizer = load_tokenizer(recipe.model)
    base = load_recipe_base(recipe, tokenizer, quantization=quantization)
    model = PeftModel.from_pretrained(base, str(run_dir), is_trainable=is_trainable)
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
