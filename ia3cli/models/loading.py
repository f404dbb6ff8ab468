"""Config, tokenizer and base model (meta device, full precision, 4-bit or 8-bit), wrapped with IA3 through PEFT.

Every way a model is named (hub id, local folder, ``pkg:`` folder inside an installed package, a GGUF file) goes
through :func:`load_config`, :func:`load_tokenizer` and :func:`load_base` with the same loading arguments, so tests
that load a tiny model from a temp dir exercise the same code a hub id takes. :func:`build_meta_model` builds the
task model on the ``meta`` device from the config alone (shapes, no weights) for the target resolver.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia3cli.config.families import HEAD_MODULES, TASKS, infer_task
from ia3cli.config.paths import looks_local
from ia3cli.config.recipe import ModelSection, Recipe
from ia3cli.env import hub_offline
from ia3cli.errors import RecipeError
from ia3cli.models.cache import announce, gguf_root, mark
from ia3cli.models.device import load_kwargs, torch_dtype
from ia3cli.models.quantization import quantization_config, unquantised_in_float32

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


PEFT_TASK_TYPES = {task: info.peft_task_type for task, info in TASKS.items()}
__all__ = ["HEAD_MODULES", "PEFT_TASK_TYPES"]  # HEAD_MODULES: heads are trained in full, so never quantised


def auto_class(task: str) -> Any:
    """The ``transformers`` auto class that builds a model for ``task``.

    Raises:
        RecipeError: for an unknown task.
    """
    import transformers

    if task not in TASKS:
        raise RecipeError("model.task", f"'{task}' is not a task", f"use one of {', '.join(TASKS)}")
    return getattr(transformers, TASKS[task].auto_class)


def _source_kwargs(model: ModelSection) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.revision:
        kwargs["revision"] = model.revision
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    return kwargs


def load_config(model: ModelSection) -> PretrainedConfig:
    """Load the ``AutoConfig`` of ``model.name`` (hub id, local directory or ``pkg:`` name).

    Honours ``revision``, ``trust_remote_code`` and ``gguf_file`` (the config is read from the GGUF metadata).

    Args:
        model: The recipe's model section.

    Raises:
        RecipeError: on ``model.name`` for a missing local directory, a directory without ``config.json``, an unknown
            or unreachable hub id (offline and not cached), an unknown model type, or a config that needs
            ``trust_remote_code``; on ``model.gguf_file`` when that file is not in the directory.
    """
    from transformers import AutoConfig

    name = model.path
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise RecipeError("model.name", f"'{model.name}' is a file, not a model directory", "name the folder instead")
    if path.is_dir():
        if model.gguf_file:
            if not (path / model.gguf_file).is_file():
                found = sorted(p.name for p in path.glob("*.gguf"))
                hint = f"GGUF files there: {', '.join(found)}" if found else "no .gguf file in that folder"
                raise RecipeError("model.gguf_file", f"'{model.gguf_file}' is not in {path}", hint)
        elif not (path / "config.json").is_file():
            raise RecipeError(
                "model.name", f"{path} has no config.json", "point at the folder written by save_pretrained()"
            )
        name = str(path)
    elif looks_local(model.name):
        raise RecipeError("model.name", f"directory not found: {model.name}", "check the path (or use a hub id)")
    try:
        return AutoConfig.from_pretrained(name, **_source_kwargs(model))
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text or "custom code" in text:
            raise RecipeError(
                "model.name",
                f"'{model.name}' ships its own modelling code, which runs only with trust_remote_code",
                "read that code, then set model.trust_remote_code: true",
            ) from None
        raise RecipeError(
            "model.name",
            f"cannot read the config of '{model.name}': {_first_line(exc)}",
            "a newer transformers may know this model type; or set model.trust_remote_code: true if it ships code",
        ) from None
    except (OSError, ImportError) as exc:
        why = "offline and not in the local cache" if hub_offline() else _first_line(exc)
        raise RecipeError(
            "model.name",
            f"cannot load the config of '{model.name}': {why}",
            "check the hub id and revision (or login for gated models); offline, download it first or use a "
            "local directory",
        ) from None


def tasks_for(model_type: str) -> tuple[str, ...]:
    """The tasks transformers has a model class for with this ``model_type``."""
    from transformers.models.auto import modeling_auto as ma

    mappings = {
        "seq-cls": ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "causal-lm": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "seq2seq": ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    }
    return tuple(task for task, names in mappings.items() if model_type in names)


def default_task(config: PretrainedConfig) -> str:
    """The task a config is for: its ``architectures``, else its family's first task (see ``families.infer_task``)."""
    model_type = str(getattr(config, "model_type", ""))
    return infer_task(
        model_type,
        getattr(config, "architectures", None),
        bool(getattr(config, "is_encoder_decoder", False)),
        tasks_for(model_type),
    )


def build_meta_model(
    config: PretrainedConfig, task: str, num_labels: int = 2, *, trust_remote_code: bool = False
) -> torch.nn.Module:
    """Instantiate the task model from ``config`` on the ``meta`` device: shapes only, no memory, no weights.

    Args:
        config: A transformers config.
        task: ``seq-cls``, ``causal-lm`` or ``seq2seq`` (picks the Auto class, hence the module names).
        num_labels: Classes of the ``seq-cls`` head.
        trust_remote_code: Allow modelling code shipped with the config.

    Raises:
        RecipeError: on ``model.task`` when the family has no model for that task (naming the tasks it has).
    """
    import torch

    auto = auto_class(task)
    if task == "seq-cls":
        config = copy.deepcopy(config)
        config.num_labels = num_labels
    try:
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        model_type = getattr(config, "model_type", "?")
        if "Unrecognized configuration class" not in str(exc):
            raise RecipeError("model.name", f"cannot build a '{model_type}' model: {_first_line(exc)}") from None
        have = tasks_for(model_type)
        hint = f"'{model_type}' supports: {', '.join(have)}" if have else None
        raise RecipeError("model.task", f"'{model_type}' models have no {task} variant in transformers", hint) from None


def load_tokenizer(model: ModelSection) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``model`` and give it a pad token when it has none (the EOS token, or UNK).

    Raises:
        RecipeError: when the tokenizer cannot be found or loaded.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model.path, **_source_kwargs(model))
    except (OSError, ValueError) as exc:
        raise RecipeError("model.name", f"cannot load a tokenizer from '{model.name}': {_first_line(exc)}") from None
    return with_pad_token(tok)


def with_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # batches are padded dynamically, so every tokenizer needs a pad token; decoder-only ones often lack it
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base(
    model: ModelSection,
    num_labels: int = 2,
    *,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    device: str | None = None,
    distributed_config: Any = None,
    quant_storage: str | None = None,
) -> PreTrainedModel:
    """Load the base model for ``model.task``.

    To load it otherwise than the recipe says (``merge`` reloads a 4-bit run in float32), pass a copy:
    ``model.model_copy(update={"quantization": "none"})``.

    Args:
        model: The recipe's model section.
        num_labels: Classes for ``seq-cls``.
        label_names: id -> name for the classification head's config.
        pad_token_id: Set on the config (decoder-only classifiers need it to find the last token).
        device: A ``--device`` value (``auto`` honours ``model.device_map``; see :mod:`ia3cli.models.device`);
            ``None`` loads as training wants it, the Trainer placing the model.
        distributed_config: A ``transformers`` ``DistributedConfig``: each rank loads only its FSDP shard of the
            weights (see :mod:`ia3cli.models.sharding`).
        quant_storage: The dtype 4-bit values are stored as (:mod:`ia3cli.models.quantization`); given, the base
            is loaded into CPU memory, to be sharded by FSDP.

    Raises:
        RecipeError: when the model cannot be found or loaded.
        Ia3Error: when bitsandbytes is needed but missing.
    """
    path = model.path
    kwargs = _source_kwargs(model)
    quant = quantization_config(model, quant_storage)
    if quant is not None:
        kwargs["quantization_config"] = quant
    kwargs["dtype"] = torch_dtype(model.dtype)
    kwargs.update(load_kwargs(device, model.device_map))
    if quant_storage is not None:
        # packed in CPU memory, whole, before FSDP moves it to the devices in shards (see models.sharding); without a
        # map bitsandbytes would pack it on the current GPU
        kwargs["device_map"] = {"": "cpu"}
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
    if distributed_config is not None:
        kwargs["distributed_config"] = distributed_config
    try:
        base = auto_class(model.task).from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise RecipeError(
            "model.name", f"cannot load '{model.name}' for task {model.task}: {_first_line(exc)}"
        ) from None
    if distributed_config is not None:
        # A tensor-parallel size of 1 is no tensor parallelism. Left at 1, PEFT (0.21) takes the model for a TP one
        # and gathers every sharded base weight on every rank at each adapter save, only to keep the IA3 vectors.
        base._tp_size = None
    if pad_token_id is not None and getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = pad_token_id
    if quant is not None:
        unquantised_in_float32(base)
    return base


def dequantized_gguf(model: ModelSection) -> Path:
    """A GGUF checkpoint dequantised to float32 safetensors, converted on first use and cached by file identity."""
    src = Path(model.path) / model.gguf_file  # type: ignore[operator]
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{model.task}".encode()).hexdigest()[:16]
    dest = gguf_root() / f"{src.stem}-{key}"
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
    mark(tmp, src)
    if dest.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.replace(dest)
        announce(dest, src)
    return dest


def modules_to_save(task: str, extra: list[str] | None, head_modules: list[str]) -> list[str] | None:
    """The ``modules_to_save`` ia3cli gives PEFT: the recipe's extra modules plus, for seq-cls, every new head module.

    PEFT adds only ``classifier``/``score`` by itself; DistilBERT's ``pre_classifier`` or BART's
    ``classification_head`` would otherwise stay frozen at their random initialisation. The target plan stores the
    result (``TargetPlan.modules_to_save``) and matches targets against exactly this list, which :func:`ia3_config`
    passes on.

    Args:
        task: The recipe's task.
        extra: ``adapter.modules_to_save``.
        head_modules: Top-level modules of the seq-cls head (``TargetPlan.head_modules``).
    """
    names = list(extra or [])
    if task == "seq-cls":
        names += [h for h in head_modules if h not in names]
    return names or None


def peft_modules_to_save(task: str, names: list[str] | None) -> list[str]:
    """What PEFT's model ends up excluding from targets: ``names`` plus, for seq-cls, the ``classifier`` and
    ``score`` that ``PeftModelForSequenceClassification`` appends itself (peft 0.21)."""
    return list(names or []) + (["classifier", "score"] if task == "seq-cls" else [])


def load_recipe_base(
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    device: str | None = None,
    distributed_config: Any = None,
    quant_storage: str | None = None,
) -> PreTrainedModel:
    """The base model as training builds it for ``recipe``: head sized and labelled, pad id from ``tokenizer``;
    on ``device`` for inference (see :func:`load_base`), or sharded across ranks by ``distributed_config``."""
    return load_base(
        recipe.model,
        recipe.num_labels,
        label_names=recipe.data.label_names,
        pad_token_id=tokenizer.pad_token_id,
        device=device,
        distributed_config=distributed_config,
        quant_storage=quant_storage,
    )


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable, total and IA3-vector parameter counts, and how many tensors FSDP sharded (``sharded_tensors``).

    A 4-bit weight counts the weights it packs (in x out), whatever its storage dtype and whether it is sharded.
    """
    trainable = total = ia3 = shards = 0
    packed = {
        f"{name}.weight": module.in_features * module.out_features
        for name, module in model.named_modules()
        if hasattr(module, "quant_state") and hasattr(module, "in_features")  # bitsandbytes' Linear4bit and kin
    }
    for name, p in model.named_parameters():
        n = packed.get(name, p.numel())
        total += n
        shards += type(p).__name__ == "DTensor"
        if p.requires_grad:
            trainable += n
            if ".ia3_l." in name:
                ia3 += n
    return {
        "trainable": trainable,
        "total": total,
        "ia3": ia3,
        "other_trainable": trainable - ia3,
        "sharded_tensors": shards,
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
