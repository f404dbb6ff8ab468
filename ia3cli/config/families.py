"""The one table of model families: what each module of a block is, which tasks a family has, where its sizes live.

Plain data and a few pure look-ups; no torch, transformers or PEFT import. The target resolver
(:mod:`ia3cli.models.targets`), ``ia3 inspect-modules``, model loading (:mod:`ia3cli.models.loading`) and the
health monitor
(:mod:`ia3cli.training.monitor`) all read it, so a new family is one entry here.

Roles name what a linear layer inside a numbered block does:

- ``attn_q``, ``attn_k``, ``attn_v``, ``attn_o``: query, key, value and output projections;
- ``attn_qkv_fused``: one projection producing Q, K and V together (GPT-2 ``c_attn``, ``query_key_value``);
- ``ffn_up``, ``ffn_gate``, ``ffn_down``: the feed-forward network's up, gate and down projections.

Modules outside a block are ``head`` (output embeddings, the new ``seq-cls`` head) or ``other``. IA3 scales keys,
values and the *input* of ``ffn_down`` (the intermediate activation). The monitor groups the vectors it watches by
role (:data:`GROUP_OF_ROLE`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple


class TaskInfo(NamedTuple):
    """How a recipe task maps onto PEFT and transformers.

    Args:
        peft_task_type: ``IA3Config.task_type``.
        auto_class: The ``transformers`` auto class building the model.
        architectures: Suffixes of ``config.architectures`` entries that name this task.
    """

    peft_task_type: str
    auto_class: str
    architectures: tuple[str, ...]


TASKS: dict[str, TaskInfo] = {
    "seq-cls": TaskInfo("SEQ_CLS", "AutoModelForSequenceClassification", ("ForSequenceClassification",)),
    "causal-lm": TaskInfo("CAUSAL_LM", "AutoModelForCausalLM", ("ForCausalLM", "LMHeadModel")),
    "seq2seq": TaskInfo("SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM", ("ForConditionalGeneration",)),
}
"""Every task ia3cli trains; ``recipe.Task`` and the CLI's ``--task`` check are built from its keys."""

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


@dataclass(frozen=True)
class Family:
    """What ia3cli knows about one ``config.model_type``.

    Args:
        roles: Module-name suffix -> role, for linear layers inside a block (the longest matching suffix wins;
            a suffix matches at a dot boundary, as PEFT's list entries do).
        tasks: Tasks transformers has a model for, in order of preference: the first is what ``inspect-modules``
            plans for when the config's ``architectures`` do not say.
        encoder_only: No decoder (BERT-like): no generation, classification heads only in practice.
        hidden_key: Config key of the model width.
        intermediate_keys: Config keys of the FFN inner width, tried in order.
        ffn_multiple: Inner width as a multiple of the width when no key gives it (GPT-2's ``n_inner: null``).
        seq_cls_head: Top-level modules of the ``seq-cls`` model that are new (randomly initialised).
    """

    roles: dict[str, str]
    tasks: tuple[str, ...]
    encoder_only: bool = False
    hidden_key: str = "hidden_size"
    intermediate_keys: tuple[str, ...] = ("intermediate_size",)
    ffn_multiple: int | None = None
    seq_cls_head: tuple[str, ...] = ("score",)


_LLAMA_ROLES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_o",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_T5_ROLES = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_o",
    "wi": "ffn_up",
    "wi_0": "ffn_gate",  # gated-gelu (flan-t5, mt5): act(wi_0 x) * wi_1 x
    "wi_1": "ffn_up",
    "wo": "ffn_down",
}
_BART_ROLES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "out_proj": "attn_o",
    "fc1": "ffn_up",
    "fc2": "ffn_down",
}
_BERT_ROLES = {
    "query": "attn_q",
    "key": "attn_k",
    "value": "attn_v",
    "attention.output.dense": "attn_o",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
}
_FALCON_ROLES = {
    "query_key_value": "attn_qkv_fused",
    "self_attention.dense": "attn_o",
    "dense_h_to_4h": "ffn_up",
    "dense_4h_to_h": "ffn_down",
}
_DECODER = ("causal-lm", "seq-cls")
_ENCODER = ("seq-cls", "causal-lm")
_LLAMA = Family(_LLAMA_ROLES, _DECODER)
_T5 = Family(_T5_ROLES, ("seq2seq", "seq-cls"), hidden_key="d_model", intermediate_keys=("d_ff",),
             seq_cls_head=("classification_head",))  # fmt: skip
_BERT = Family(_BERT_ROLES, _ENCODER, encoder_only=True, seq_cls_head=("classifier",))

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "phi": Family(
        {
            "q_proj": "attn_q",
            "k_proj": "attn_k",
            "v_proj": "attn_v",
            "self_attn.dense": "attn_o",
            "fc1": "ffn_up",
            "fc2": "ffn_down",
        },
        _DECODER,
    ),
    "t5": _T5,
    "mt5": _T5,
    "bart": Family(
        _BART_ROLES,
        ("seq2seq", "seq-cls", "causal-lm"),
        hidden_key="d_model",
        intermediate_keys=("encoder_ffn_dim", "decoder_ffn_dim"),
        seq_cls_head=("classification_head",),
    ),
    "opt": Family(_BART_ROLES, _DECODER, intermediate_keys=("ffn_dim",)),
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": Family(
        {
            "q_lin": "attn_q",
            "k_lin": "attn_k",
            "v_lin": "attn_v",
            "out_lin": "attn_o",
            "lin1": "ffn_up",
            "lin2": "ffn_down",
        },
        ("seq-cls",),
        encoder_only=True,
        hidden_key="dim",
        intermediate_keys=("hidden_dim",),
        seq_cls_head=("pre_classifier", "classifier"),
    ),
    "gpt2": Family(
        {"c_attn": "attn_qkv_fused", "attn.c_proj": "attn_o", "c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
        _DECODER,
        hidden_key="n_embd",
        intermediate_keys=("n_inner",),
        ffn_multiple=4,
    ),
    "gpt_neox": Family(
        {
            "query_key_value": "attn_qkv_fused",
            "attention.dense": "attn_o",
            "dense_h_to_4h": "ffn_up",
            "dense_4h_to_h": "ffn_down",
        },
        _DECODER,
    ),
    "falcon": Family(_FALCON_ROLES, _DECODER, intermediate_keys=("ffn_hidden_size",), ffn_multiple=4),
    "bloom": Family(_FALCON_ROLES, _DECODER, intermediate_keys=(), ffn_multiple=4),
}

ENCODER_ONLY_TYPES = frozenset({"deberta", "deberta-v2", "electra", "albert", "mpnet"}) | {
    name for name, fam in FAMILIES.items() if fam.encoder_only
}
"""Encoder-only model types, including some without a role table (planned by shape analysis)."""

GENERIC_INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "d_ff", "n_inner", "ffn_hidden_size")
"""Config keys holding the FFN inner width for families not in the table, in the order they are tried."""

HEAD_MODULES: list[str] = list(dict.fromkeys([h for f in FAMILIES.values() for h in f.seq_cls_head] + ["lm_head"]))
"""Head modules of every family: trained in full (``seq-cls``) or tied to embeddings, so never quantised."""

# Name hints for shape analysis (families not in the table), matched against the last name component, lower-cased.
NAME_HINTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attn_qkv_fused", re.compile(r"c_attn|query_key_value|qkv|qkv_proj|wqkv|w_pack|in_proj|qkv_lin")),
    ("attn_q", re.compile(r"q|q_proj|query|q_lin|wq|query_proj|q_attn")),
    ("attn_k", re.compile(r"k|k_proj|key|k_lin|wk|key_proj")),
    ("attn_v", re.compile(r"v|v_proj|value|v_lin|wv|value_proj")),
    ("attn_o", re.compile(r"o|o_proj|out_proj|out_lin|c_proj|dense|wo|output")),
    ("ffn_gate", re.compile(r".*gate.*|wi_0|w1")),
    ("ffn_down", re.compile(r"down_proj|fc2|fc_out|w2|lin2|dense_4h_to_h|wo")),
    ("ffn_up", re.compile(r"up_proj|fc1|fc_in|w3|lin1|dense_h_to_4h|wi|wi_1|c_fc")),
)
GATE_NAME = re.compile(r".*gate.*|wi_0|w1")
ATTENTION_OUTPUT_NAMES = ("o", "o_proj", "out_proj", "out_lin")
"""Names that are attention outputs wherever they sit ("dense", "output", "wo" only under an attention parent)."""

GROUPS = ("q", "k", "v", "qkv", "ff", "other")
"""The groups the health monitor reports IA3 vectors in, in display order."""

GROUP_OF_ROLE = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_qkv_fused": "qkv"}
"""Group of a non-feed-forward target by role; every other role is ``other``."""


def in_block(name: str) -> bool:
    """Whether a module sits inside a numbered block (``model.layers.3.mlp.down_proj``)."""
    return any(part.isdigit() for part in name.split("."))


def dotted_match(suffix: str, name: str) -> bool:
    """PEFT's list rule for one entry: ``name == suffix`` or ``name`` ends with ``"." + suffix``."""
    return name == suffix or name.endswith("." + suffix)


def role_in(roles: dict[str, str], name: str) -> str | None:
    """The role ``roles`` gives module ``name`` (the longest matching suffix wins), or ``None``."""
    return next((roles[s] for s in sorted(roles, key=len, reverse=True) if dotted_match(s, name)), None)


def role_of(model_type: str, name: str) -> str | None:
    """The role of the in-block module ``name`` from the family table (longest suffix wins).

    Args:
        model_type: ``config.model_type``.
        name: Full module name (a PEFT prefix such as ``base_model.model.`` does not matter).

    Returns:
        The role, or ``None`` for an unknown family, a module outside a block, or a name not in the table.
    """
    family = FAMILIES.get(model_type)
    if family is None or not in_block(name):
        return None
    return role_in(family.roles, name)


def group_of(role: str | None, feedforward: bool) -> str:
    """The health-monitor group of an IA3 target: ``ff`` when its input is scaled, else by role.

    Args:
        role: The module's role (``None`` when unknown).
        feedforward: Whether PEFT treats the target as feed-forward.
    """
    if feedforward:
        return "ff"
    return GROUP_OF_ROLE.get(role or "", "other")


def infer_task(
    model_type: str, architectures: list[str] | None, is_encoder_decoder: bool, supported: tuple[str, ...]
) -> str:
    """The task to plan for when none is given, from what the config says.

    ``config.architectures`` decides first (``*ForCausalLM``/``*LMHeadModel``: causal-lm,
    ``*ForSequenceClassification``: seq-cls, ``*ForConditionalGeneration`` of an encoder-decoder: seq2seq), then
    the family's first task, then seq2seq for an encoder-decoder, then the first task transformers supports.

    Args:
        model_type: ``config.model_type``.
        architectures: ``config.architectures`` (may be ``None``).
        is_encoder_decoder: ``config.is_encoder_decoder``.
        supported: Tasks transformers has a model for with this model type.
    """
    for arch in architectures or []:
        for task, info in TASKS.items():
            if task == "seq2seq" and not is_encoder_decoder:
                continue
            if arch.endswith(info.architectures) and task in supported:
                return task
    family = FAMILIES.get(model_type)
    if family is not None:
        return family.tasks[0]
    if is_encoder_decoder and "seq2seq" in supported:
        return "seq2seq"
    if model_type in ENCODER_ONLY_TYPES and "seq-cls" in supported:
        return "seq-cls"
    preference = ("causal-lm", "seq-cls", "seq2seq")
    return next((t for t in preference if t in supported), "causal-lm")
