"""IA3 target modules from the model config alone: which modules to scale, how many vectors, what it costs.

IA3 (Liu et al. 2022) multiplies the keys, the values and the intermediate FFN activation by learned vectors. In
PEFT terms that is ``target_modules`` = the key and value projections plus the FFN down-projection, and
``feedforward_modules`` = the down-projection (its *input*, the intermediate activation, is scaled; other targets
have their *output* scaled). Getting these names wrong is silent in PEFT: list entries that match nothing are
skipped, and several of PEFT's built-in defaults differ from the paper (queries instead of keys for qwen2/3, gemma,
phi; queries and keys for OPT; BERT's ``output.dense`` also hits ``attention.output.dense``; no DistilBERT entry).

Everything here runs on a model built on the ``meta`` device from its config: no weights are read or allocated, so
a 70B config answers in seconds. Matching follows PEFT 0.21 exactly:

* a list entry targets module ``name`` when ``name == entry`` or ``name.endswith("." + entry)``;
* a string is a regex, ``re.fullmatch``-ed against the full module name;
* a feed-forward *list* entry matches a target when ``name.endswith(entry)`` (no dot boundary!), a string by
  ``re.fullmatch``; and when both are lists PEFT requires every feed-forward entry to appear in ``target_modules``;
* modules matched by ``modules_to_save`` (for ``seq-cls`` PEFT adds ``classifier`` and ``score``) are never wrapped.

Torch, transformers and PEFT are imported inside functions: ``ia3 --help`` must not import them.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia3cli.errors import RecipeError
from ia3cli.modeling import auto_class
from ia3cli.recipe import AdapterSection, ModelSection, resolve_model_path

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

TASKS = ("seq-cls", "causal-lm", "seq2seq")
ROLES = ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv_fused", "ffn_up", "ffn_gate", "ffn_down", "head", "other")

# Role of each linear-like module by name suffix, per family (the longest matching suffix wins). Only modules inside
# a numbered block (``layers.3.``) get a role from here; heads and other top-level modules are ``head``/``other``.
_LLAMA_STYLE = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_o",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_T5_STYLE = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_o",
    "wi": "ffn_up",
    "wi_0": "ffn_gate",  # gated-gelu (flan-t5, mt5): act(wi_0 x) * wi_1 x
    "wi_1": "ffn_up",
    "wo": "ffn_down",
}
_BART_STYLE = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "out_proj": "attn_o",
    "fc1": "ffn_up",
    "fc2": "ffn_down",
}
_BERT_STYLE = {
    "query": "attn_q",
    "key": "attn_k",
    "value": "attn_v",
    "attention.output.dense": "attn_o",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
}
_FALCON_STYLE = {
    "query_key_value": "attn_qkv_fused",
    "self_attention.dense": "attn_o",
    "dense_h_to_4h": "ffn_up",
    "dense_4h_to_h": "ffn_down",
}
FAMILIES: dict[str, dict[str, str]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
    "gemma3_text": _LLAMA_STYLE,
    "phi": {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "self_attn.dense": "attn_o",
        "fc1": "ffn_up",
        "fc2": "ffn_down",
    },
    "t5": _T5_STYLE,
    "mt5": _T5_STYLE,
    "bart": _BART_STYLE,
    "opt": _BART_STYLE,
    "bert": _BERT_STYLE,
    "roberta": _BERT_STYLE,
    "xlm-roberta": _BERT_STYLE,
    "distilbert": {
        "q_lin": "attn_q",
        "k_lin": "attn_k",
        "v_lin": "attn_v",
        "out_lin": "attn_o",
        "lin1": "ffn_up",
        "lin2": "ffn_down",
    },
    "gpt2": {"c_attn": "attn_qkv_fused", "attn.c_proj": "attn_o", "c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
    "gpt_neox": {
        "query_key_value": "attn_qkv_fused",
        "attention.dense": "attn_o",
        "dense_h_to_4h": "ffn_up",
        "dense_4h_to_h": "ffn_down",
    },
    "falcon": _FALCON_STYLE,
    "bloom": _FALCON_STYLE,
}

# Encoder-only families: `recommend` without a task plans for a classification head.
_ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert", "mpnet"}

# Config keys holding the FFN intermediate size, in the order they are tried.
_INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "d_ff", "n_inner", "ffn_hidden_size")

# Name hints for shape analysis (unknown families), matched against the last name component, lower-cased.
_HINTS = (
    ("attn_qkv_fused", re.compile(r"c_attn|query_key_value|qkv|qkv_proj|wqkv|w_pack|in_proj|qkv_lin")),
    ("attn_q", re.compile(r"q|q_proj|query|q_lin|wq|query_proj|q_attn")),
    ("attn_k", re.compile(r"k|k_proj|key|k_lin|wk|key_proj")),
    ("attn_v", re.compile(r"v|v_proj|value|v_lin|wv|value_proj")),
    ("attn_o", re.compile(r"o|o_proj|out_proj|out_lin|c_proj|dense|wo|output")),
    ("ffn_gate", re.compile(r".*gate.*|wi_0|w1")),
    ("ffn_down", re.compile(r"down_proj|fc2|fc_out|w2|lin2|dense_4h_to_h|wo")),
    ("ffn_up", re.compile(r"up_proj|fc1|fc_in|w3|lin1|dense_h_to_4h|wi|wi_1|c_fc")),
)


@dataclass
class TargetPlan:
    """The IA3 targets for one model, how they were found, and what they cost.

    Args:
        model_type: ``config.model_type``.
        target_modules: For ``IA3Config``: a list of name suffixes, or one regex over full module names.
        feedforward_modules: For ``IA3Config``: the targets whose input is scaled (same forms).
        ia3_params: IA3 vector entries PEFT creates: ``out_features`` per target, ``in_features`` per feed-forward.
        lora_r8_params: A LoRA adapter of rank 8 on the same modules: ``8 * (in + out)`` each, for comparison.
        adapter_bytes_fp32: ``adapter_model.safetensors`` size in float32: 4 bytes per entry plus the header
            (tensor names, shapes, offsets). Exact for PEFT 0.21 IA3 vectors; ``modules_to_save`` (the ``seq-cls``
            head) are saved in full on top.
        adapter_bytes_fp16: The same in float16/bfloat16.
        warnings: Likely mistakes, each with the fix.
        notes: How the plan was made and how it differs from PEFT's default.
        method: ``family`` (known family table), ``shape-analysis`` (unknown family) or ``explicit`` (recipe's list).
        peft_default: PEFT's built-in ``{"target_modules", "feedforward_modules"}`` for this model type, or None.
        modules: Linear-like modules grouped by name pattern (layer index as ``*``): pattern, count, in_features,
            out_features, kind, role, targeted, feedforward (and targeted_count when only some are targeted).
        task: The head the plan was made for (module names depend on it).
        hidden_size: Model width, from the config or the shapes.
        intermediate_size: FFN inner width, from the config or the shapes (None when not found).
        targeted_names: Full names of the modules PEFT will wrap.
        feedforward_names: The subset of ``targeted_names`` treated as feed-forward.
        head_modules: Top-level modules of a ``seq-cls`` head (randomly initialised; train them via
            ``modules_to_save``: PEFT adds only ``classifier`` and ``score`` by itself).
        fan_in_fan_out: True when a target is a ``Conv1D`` (GPT-2 style, weight stored as (in, out)).
    """

    model_type: str
    target_modules: list[str] | str
    feedforward_modules: list[str] | str
    ia3_params: int
    lora_r8_params: int
    adapter_bytes_fp32: int
    adapter_bytes_fp16: int
    warnings: list[str]
    notes: list[str]
    method: str
    peft_default: dict | None
    modules: list[dict]
    task: str = "causal-lm"
    hidden_size: int | None = None
    intermediate_size: int | None = None
    targeted_names: list[str] = field(default_factory=list)
    feedforward_names: list[str] = field(default_factory=list)
    head_modules: list[str] = field(default_factory=list)
    fan_in_fan_out: bool = False

    def to_json(self) -> dict:
        """The plan as a JSON-ready dict (every field)."""
        return asdict(self)


@dataclass
class _Module:
    name: str
    kind: str
    in_features: int
    out_features: int
    linear: bool  # Linear/Conv1D (and bitsandbytes subclasses); Conv2d/Conv3d are wrappable but not linear-like
    role: str = "other"


# ---------------------------------------------------------------------------------------------------------------
# config and meta model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.sep in name.replace("/", "")


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

    name = resolve_model_path(model.name)
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
    elif _looks_local(model.name):
        raise RecipeError("model.name", f"directory not found: {model.name}", "check the path (or use a hub id)")
    kwargs: dict[str, Any] = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
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
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "offline and not in the local cache" if offline else _first_line(exc)
        raise RecipeError(
            "model.name",
            f"cannot load the config of '{model.name}': {why}",
            "check the hub id and revision (or login for gated models); offline, download it first or use a "
            "local directory",
        ) from None


def _tasks_for(model_type: str) -> list[str]:
    from transformers.models.auto import modeling_auto as ma

    mappings = {
        "seq-cls": ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "causal-lm": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "seq2seq": ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    }
    return [task for task, names in mappings.items() if model_type in names]


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
        have = _tasks_for(model_type)
        hint = f"'{model_type}' supports: {', '.join(have)}" if have else None
        raise RecipeError("model.task", f"'{model_type}' models have no {task} variant in transformers", hint) from None


def _default_task(config: PretrainedConfig) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = getattr(config, "architectures", None) or []
    if any("CausalLM" in a or "LMHeadModel" in a for a in archs):
        return "causal-lm"
    if config.model_type in _ENCODER_ONLY or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "seq-cls"
    return "causal-lm"


# ---------------------------------------------------------------------------------------------------------------
# module scan


def _scan(model: torch.nn.Module) -> tuple[list[str], dict[str, _Module]]:
    """All module names (PEFT matches against every one) and the wrappable ones with their shapes."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names: list[str] = []
    found: dict[str, _Module] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        names.append(name)
        if isinstance(module, torch.nn.Linear):  # includes bitsandbytes Linear4bit / Linear8bitLt
            found[name] = _Module(name, type(module).__name__, module.in_features, module.out_features, True)
        elif isinstance(module, Conv1D):  # weight stored as (in, out)
            n_in, n_out = module.weight.shape
            found[name] = _Module(name, "Conv1D", int(n_in), int(n_out), True)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            kind = type(module).__name__
            found[name] = _Module(name, kind, module.in_channels, module.out_channels, False)
    return names, found


def _in_block(name: str) -> bool:
    return any(part.isdigit() for part in name.split("."))


def _pattern(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _head_roots(model: torch.nn.Module, task: str) -> tuple[set[str], list[str]]:
    """Names of head modules (output embeddings; for seq-cls the classifier) and the seq-cls head's top modules."""
    heads: set[str] = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        heads.update(name for name, module in model.named_modules() if module is out)
    roots: list[str] = []
    if task == "seq-cls":
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
        for child_name, child in model.named_children():
            if child is backbone or not any(True for _ in child.parameters()):
                continue
            roots.append(child_name)
    return heads, roots


def _is_under(name: str, roots: Iterable[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _dotted_match(suffix: str, name: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _assign_roles_family(mods: dict[str, _Module], table: dict[str, str]) -> None:
    suffixes = sorted(table, key=len, reverse=True)
    for m in mods.values():
        if m.role != "other" or not _in_block(m.name):
            continue
        m.role = next((table[s] for s in suffixes if _dotted_match(s, m.name)), "other")


def _assign_roles_shapes(mods: dict[str, _Module], hidden: int | None, inter: int | None) -> None:
    """Roles for an unknown family: the down-projection by shape (in == intermediate), the rest by name hints."""
    for m in mods.values():
        if m.role != "other" or not _in_block(m.name):
            continue
        last = m.name.rsplit(".", 1)[-1].lower()
        context = ".".join(m.name.lower().split(".")[-3:-1])  # parent and grandparent
        if inter and hidden and inter != hidden:
            if m.in_features == inter and m.out_features == hidden:
                m.role = "ffn_down"
                continue
            if m.in_features == hidden and m.out_features == inter:
                m.role = "ffn_gate" if re.fullmatch(r".*gate.*|wi_0|w1", last) else "ffn_up"
                continue
        for role, hint in _HINTS:
            if hint.fullmatch(last):
                # "dense"/"output"/"wo"/"c_proj" are attention outputs only under an attention parent
                if role == "attn_o" and "att" not in context and last not in ("o", "o_proj", "out_proj", "out_lin"):
                    continue
                m.role = role
                break


def _sizes(config: PretrainedConfig, mods: dict[str, _Module]) -> tuple[int | None, int | None]:
    """Hidden size and FFN intermediate size: from the config when the shapes confirm it, else from the shapes."""
    from collections import Counter

    block = [m for m in mods.values() if _in_block(m.name) and m.linear]
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        counts = Counter(m.out_features for m in block)
        hidden = counts.most_common(1)[0][0] if counts else None
    inter = None
    for key in _INTERMEDIATE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            inter = value
            break
    if inter is None and config.model_type == "distilbert":
        inter = getattr(config, "hidden_dim", None)
    if inter is None and config.model_type == "gpt2" and isinstance(hidden, int):
        inter = 4 * hidden
    if inter is not None and not any(m.in_features == inter for m in block):
        inter = None  # the config's number is not what the modules show (e.g. MoE, per-layer sizes)
    if inter is None and hidden is not None:
        counts = Counter(m.in_features for m in block if m.out_features == hidden and m.in_features != hidden)
        inter = counts.most_common(1)[0][0] if counts else None
    return hidden, inter


# ---------------------------------------------------------------------------------------------------------------
# PEFT's matching rules, and writing a set of modules back as a spec PEFT accepts


def _target_matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def _ff_matches(spec: list[str] | str, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(entry) for entry in spec)  # PEFT: plain suffix, no dot boundary


def _excluded(name: str, modules_to_save: list[str]) -> bool:
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _suffix(name: str, depth: int) -> list[str]:
    return name.split(".")[-depth:]


def _as_list(selected: list[str], universe: list[str]) -> list[str] | None:
    """Shortest suffixes (no layer index) whose PEFT list matching selects exactly ``selected``; None if impossible."""
    chosen = set(selected)
    others = [n for n in universe if n not in chosen]
    entries: list[str] = []
    done: set[str] = set()
    for name in selected:
        if _pattern(name) in done:
            continue
        done.add(_pattern(name))
        for depth in range(1, 4):
            parts = _suffix(name, depth)
            if any(p.isdigit() for p in parts) or depth > name.count(".") + 1:
                return None
            entry = ".".join(parts)
            if not any(_dotted_match(entry, o) for o in others):
                if entry not in entries:
                    entries.append(entry)
                break
        else:
            return None
    if {n for n in universe if _target_matches(entries, n)} != chosen:
        return None
    return entries


def _as_regex(selected: list[str], universe: list[str]) -> str:
    """One regex, ``re.fullmatch``-ed on full names, selecting exactly ``selected`` from ``universe``."""
    chosen = set(selected)
    others = [n for n in universe if n not in chosen]
    alts: list[str] = []
    anchored = False
    done: set[str] = set()
    for name in selected:
        if _pattern(name) in done:
            continue
        done.add(_pattern(name))
        depth_max = name.count(".") + 1
        for depth in range(1, depth_max + 1):
            alt = r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in _suffix(name, depth))
            if depth == depth_max:
                anchored = True
                break
            rx = re.compile(rf"(?:.*\.)?(?:{alt})")
            if not any(rx.fullmatch(o) for o in others):
                break
        if alt not in alts:
            alts.append(alt)
    if not alts:
        return "$^"
    prefix = r"(?:.*\.)?" if anchored else r".*\."
    body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
    pattern = prefix + body
    if {n for n in universe if re.fullmatch(pattern, n)} != chosen:  # cannot happen; keep the plan exact anyway
        pattern = "|".join(re.escape(n) for n in selected)
    return pattern


def _express_targets(selected: list[str], universe: list[str]) -> list[str] | str:
    return _as_list(selected, universe) or _as_regex(selected, universe)


def _express_ff(
    target_spec: list[str] | str, targeted: list[str], ff: list[str], universe: list[str]
) -> list[str] | str:
    """Feed-forward spec selecting exactly ``ff`` among ``targeted`` under PEFT's rules: a list where PEFT's
    literal-subset check and suffix rule allow it, else a regex that selects exactly ``ff`` among *all* modules (so
    it reads right on its own, although PEFT applies it to targets only)."""
    if not ff:
        return []
    wanted = set(ff)
    if isinstance(target_spec, list):
        entries = [
            e
            for e in target_spec
            if any(n.endswith(e) for n in wanted) and not any(n.endswith(e) for n in targeted if n not in wanted)
        ]
        if {n for n in targeted if _ff_matches(entries, n)} == wanted:
            return entries
    return _as_regex(ff, universe)


# ---------------------------------------------------------------------------------------------------------------
# plans


def _short(name_or_pattern: str) -> str:
    """A readable short name: the part after the last layer index (``self_attn.k_proj``, ``output.dense``)."""
    parts = _pattern(name_or_pattern).split(".")
    if "*" in parts:
        tail = parts[len(parts) - parts[::-1].index("*") :]
        return ".".join(tail) if tail else name_or_pattern
    return name_or_pattern


def _shorts(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        s = _short(n)
        if s not in out:
            out.append(s)
    return out


def _peft_default(model_type: str) -> dict | None:
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    if model_type not in TARGETS:
        return None
    return {"target_modules": list(TARGETS[model_type]), "feedforward_modules": list(FF.get(model_type, []))}


def _compare_with_peft(
    model_type: str,
    default: dict | None,
    mods: dict[str, _Module],
    universe: list[str],
    mts: list[str],
    targeted: list[str],
    ff: list[str],
) -> list[str]:
    """Notes on how PEFT's built-in default for this model type differs from ``targeted``/``ff``."""
    if default is None:
        return [
            f"PEFT has no IA3 default for model type '{model_type}' (IA3Config without target_modules raises); "
            "ia3cli passes the targets above explicitly."
        ]
    p_targets = [n for n in universe if _target_matches(default["target_modules"], n) and not _excluded(n, mts)]
    p_ff = [n for n in p_targets if _ff_matches(default["feedforward_modules"], n)]
    notes: list[str] = []
    for entry in default["target_modules"]:
        if not any(_target_matches([entry], n) for n in universe):
            notes.append(f"PEFT's default entry '{entry}' matches no module here; PEFT would skip it silently.")
    extra = [n for n in p_targets if n not in set(targeted)]
    missing = [n for n in targeted if n not in set(p_targets)]
    if extra or missing:

        def described(names: list[str]) -> str:
            return ", ".join(f"{_short(n)} ({mods[n].role})" for n in _firsts(names))

        parts = []
        if extra:
            parts.append(f"also scales {described(extra)}")
        if missing:
            parts.append(f"does not scale {described(missing)}")
        roles_extra = {mods[n].role for n in extra if n in mods}
        roles_missing = {mods[n].role for n in missing if n in mods}
        why = "; the IA3 paper scales keys, values and the FFN down-projection's input"
        if "attn_q" in roles_extra and "attn_k" in roles_missing:
            why = " - queries instead of keys; the IA3 paper scales keys and values"
        notes.append(f"PEFT's default {default['target_modules']} {' and '.join(parts)}{why}.")
    ff_extra = [n for n in p_ff if n not in set(ff)]
    if ff_extra:
        notes.append(
            f"PEFT's default treats {', '.join(_shorts(ff_extra))} as feed-forward too (its feed-forward entries "
            "are plain suffixes), scaling their input instead of their output."
        )
    if not notes:
        notes.append(f"Same modules as PEFT's default {default['target_modules']}.")
    return notes


def _firsts(names: list[str]) -> list[str]:
    """One representative name per pattern, in order (pairs with ``_shorts``)."""
    seen: dict[str, str] = {}
    for n in names:
        seen.setdefault(_short(n), n)
    return list(seen.values())


def _table(mods: dict[str, _Module], targeted: set[str], ff: set[str]) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for m in mods.values():
        key = (_pattern(m.name), m.kind, m.in_features, m.out_features, m.role)
        row = groups.setdefault(
            key,
            {
                "pattern": key[0],
                "count": 0,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "kind": m.kind,
                "role": m.role,
                "targeted_count": 0,
                "feedforward_count": 0,
            },
        )
        row["count"] += 1
        row["targeted_count"] += m.name in targeted
        row["feedforward_count"] += m.name in ff
    rows = list(groups.values())
    for row in rows:
        row["targeted"] = row["targeted_count"] > 0
        row["feedforward"] = row["feedforward_count"] > 0
    return rows


def _safetensors_bytes(shapes: dict[str, tuple[int, int]], itemsize: int, dtype: str) -> int:
    """Size of the safetensors file PEFT writes for these IA3 vectors: 8-byte length, JSON header padded to 8
    bytes (tensors sorted by name, as safetensors does), then the data."""
    offset = 0
    parts = []
    for key in sorted(shapes):
        rows, cols = shapes[key]
        end = offset + rows * cols * itemsize
        parts.append(f'"{key}":{{"dtype":"{dtype}","shape":[{rows},{cols}],"data_offsets":[{offset},{end}]}}')
        offset = end
    header = '{"__metadata__":{"format":"pt"},' + ",".join(parts) + "}"
    return 8 + len(header) + (-len(header) % 8) + offset


def _counts(mods: dict[str, _Module], targeted: list[str], ff: set[str]) -> tuple[int, int, int, int]:
    ia3 = sum(mods[n].in_features if n in ff else mods[n].out_features for n in targeted)
    lora = sum(8 * (mods[n].in_features + mods[n].out_features) for n in targeted)
    # PEFT saves "base_model.model.<name>.ia3_l", shaped (1, in) for feed-forward targets and (out, 1) otherwise
    shapes = {
        f"base_model.model.{n}.ia3_l": (1, mods[n].in_features) if n in ff else (mods[n].out_features, 1)
        for n in targeted
    }
    return ia3, lora, _safetensors_bytes(shapes, 4, "F32"), _safetensors_bytes(shapes, 2, "F16")


def _paper_selection(mods: dict[str, _Module]) -> tuple[list[str], list[str], list[str]]:
    """Keys, values (or the fused QKV module) and down-projections, in model order; plus warnings."""
    warnings: list[str] = []
    block = [m for m in mods.values() if _in_block(m.name)]
    kv = [m.name for m in block if m.role in ("attn_k", "attn_v")]
    fused = [m.name for m in block if m.role == "attn_qkv_fused"]
    if fused:
        warnings.append(
            f"keys and values live in a fused module ({', '.join(_shorts(fused))}): IA3 on it scales the queries "
            "too (one vector over Q, K and V), close to but not exactly the paper's recipe."
        )
    down = [m.name for m in block if m.role == "ffn_down"]
    selected = set(kv) | set(fused) | set(down)
    targets = [m.name for m in mods.values() if m.name in selected]
    if not kv and not fused:
        warnings.append(
            "found no key/value projections; set adapter.target_modules explicitly (see `ia3 inspect-modules`)."
        )
    if not down:
        warnings.append("found no FFN down-projection; IA3 will scale attention only (no feed-forward vector).")
    return targets, down, warnings


def _make_plan(
    model: torch.nn.Module,
    config: PretrainedConfig,
    task: str,
    adapter: AdapterSection | None,
    use_family_table: bool,
) -> TargetPlan:
    names, mods = _scan(model)
    model_type = str(getattr(config, "model_type", "unknown"))
    heads, head_roots = _head_roots(model, task)
    for m in mods.values():
        if m.name in heads or _is_under(m.name, head_roots):
            m.role = "head"
    hidden, inter = _sizes(config, mods)
    table = FAMILIES.get(model_type) if use_family_table else None
    notes: list[str] = []
    if table is not None:
        _assign_roles_family(mods, table)
        method = "family"
        notes.append(f"Roles from ia3cli's table for '{model_type}'.")
    else:
        _assign_roles_shapes(mods, hidden, inter)
        method = "shape-analysis"
        notes.append(
            f"'{model_type}' is not in ia3cli's family table: roles come from shape analysis (the down-projection "
            f"is the linear whose input is the intermediate size {inter}) and name hints (k/key, v/value). "
            "Check the table below."
        )
    mts = list(adapter.modules_to_save or []) if adapter else []
    if task == "seq-cls":
        mts += ["classifier", "score"]
    universe = names
    warnings: list[str] = []
    rec_targets, rec_ff, rec_warnings = _paper_selection(mods)

    explicit_t = adapter is not None and adapter.target_modules != "auto"
    explicit_f = adapter is not None and adapter.feedforward_modules != "auto"
    if not explicit_t and not explicit_f:
        target_spec: list[str] | str = _express_targets(rec_targets, universe)
        ff_spec: list[str] | str = _express_ff(target_spec, rec_targets, rec_ff, universe)
        warnings += rec_warnings
    else:
        method = "explicit"
        assert adapter is not None
        if explicit_t:
            target_spec = _check_targets(adapter.target_modules, universe, mods, mts)
            if target_spec == "all-linear":
                picked = [n for n, m in mods.items() if m.linear and m.role != "head" and not _excluded(n, mts)]
                target_spec = _express_targets(picked, universe)
                notes.append(f"'all-linear' expanded to {len(picked)} modules.")
        else:
            target_spec = _express_targets(rec_targets, universe)
            warnings += rec_warnings
        targeted = [n for n in universe if _target_matches(target_spec, n) and not _excluded(n, mts)]
        if explicit_f:
            ff_spec = _check_feedforward(adapter.feedforward_modules, target_spec, targeted, universe, mods)
        else:
            ff_spec = _express_ff(target_spec, targeted, [n for n in rec_ff if n in set(targeted)], universe)
            notes.append(
                "feedforward_modules is auto: the recommended feed-forward modules (FFN down-projections) among "
                "your targets."
            )
    targeted = [n for n in universe if _target_matches(target_spec, n) and not _excluded(n, mts)]
    ff_names = [n for n in targeted if _ff_matches(ff_spec, n)]
    if not targeted and adapter is not None:  # recommend() still shows the table, with a warning
        raise RecipeError(
            "adapter.target_modules",
            f"selects no module of this '{model_type}' model",
            "list the key/value/down-projection names explicitly; `ia3 inspect-modules MODEL` shows them",
        )
    if method == "explicit":
        lint_warnings, lint_notes = _lint(targeted, ff_names, ff_spec, mods, inter)
        warnings += lint_warnings
        notes += lint_notes
    ff_set = set(ff_names)
    ia3, lora, b32, b16 = _counts(mods, targeted, ff_set)
    default = _peft_default(model_type)
    notes += _compare_with_peft(model_type, default, mods, universe, mts, targeted, ff_names)
    if head_roots:
        notes.append(
            f"The classification head ({', '.join(head_roots)}) is new and must train in full: PEFT adds only "
            "'classifier'/'score' to modules_to_save by itself."
        )
    return TargetPlan(
        model_type=model_type,
        target_modules=target_spec,
        feedforward_modules=ff_spec,
        ia3_params=ia3,
        lora_r8_params=lora,
        adapter_bytes_fp32=b32,
        adapter_bytes_fp16=b16,
        warnings=warnings,
        notes=notes,
        method=method,
        peft_default=default,
        modules=_table(mods, set(targeted), ff_set),
        task=task,
        hidden_size=hidden,
        intermediate_size=inter,
        targeted_names=targeted,
        feedforward_names=ff_names,
        head_modules=head_roots,
        fan_in_fan_out=any(mods[n].kind == "Conv1D" for n in targeted),
    )


def _close_names(entry: str, mods: dict[str, _Module]) -> list[str]:
    suffixes: set[str] = set()
    for n in mods:
        parts = n.split(".")
        for depth in (1, 2):
            if len(parts) >= depth and not any(p.isdigit() for p in parts[-depth:]):
                suffixes.add(".".join(parts[-depth:]))
    return difflib.get_close_matches(entry, sorted(suffixes), n=4, cutoff=0.5)


def _entries(key: str, spec: list[str] | str) -> list[tuple[str, list[str] | str]]:
    """(label, one-entry spec) pairs to test one by one; a regex must compile."""
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as exc:
            raise RecipeError(key, f"'{spec}' is not a valid regex: {exc}") from None
        return [(spec, spec)]
    return [(e, [e]) for e in spec]


def _check_targets(
    spec: list[str] | str, universe: list[str], mods: dict[str, _Module], mts: list[str]
) -> list[str] | str:
    """Every entry must select at least one wrappable module, and nothing PEFT cannot wrap."""
    key = "adapter.target_modules"
    if spec == "all-linear":
        return spec
    if isinstance(spec, list) and not spec:
        raise RecipeError(key, "is an empty list", "use `auto`, or list module-name suffixes")
    entries = _entries(key, spec)
    problems: list[str] = []
    hints: list[str] = []
    for label, one in entries:
        hits = [n for n in universe if _target_matches(one, n) and not _excluded(n, mts)]
        if not hits:
            problems.append(f"entry '{label}' matches no module")
            close = _close_names(label.rsplit(".", 1)[-1], mods) if isinstance(one, list) else []
            if isinstance(one, str) and re.fullmatch(r"[\w.]+", label):
                hints.append(
                    "a single string is a regex matched against FULL module names (e.g. "
                    f"'{next(iter(mods), 'model.layers.0.self_attn.k_proj')}'); for suffixes write a list: [{label}]"
                )
            elif close:
                hints.append(f"close names: {', '.join(close)}")
            continue
        bad = [n for n in hits if n not in mods]
        if bad:
            problems.append(
                f"entry '{label}' matches {bad[0]}, which is not a linear layer (PEFT's IA3 cannot wrap it)"
            )
            hints.append("name the linear layers inside it; `ia3 inspect-modules` lists them")
    if problems:
        hints.append("`ia3 inspect-modules MODEL` lists every linear layer with its role")
        message = problems[0] if len(problems) == 1 else "; ".join(problems)
        raise RecipeError(key, message, "; ".join(dict.fromkeys(hints)))
    return spec


def _check_feedforward(
    spec: list[str] | str,
    target_spec: list[str] | str,
    targeted: list[str],
    universe: list[str],
    mods: dict[str, _Module],
) -> list[str] | str:
    """Feed-forward entries must select targeted modules only, and (both lists) appear in target_modules."""
    key = "adapter.feedforward_modules"
    entries = _entries(key, spec)
    if isinstance(spec, list) and isinstance(target_spec, list):
        outside = [e for e in spec if e not in target_spec]
        if outside:
            raise RecipeError(
                key,
                f"{', '.join(repr(e) for e in outside)} not in target_modules (PEFT requires feed-forward entries "
                "to be a subset of target_modules)",
                f"add {', '.join(outside)} to adapter.target_modules, or remove it here",
            )
    targeted_set = set(targeted)
    not_subset: list[str] = []
    unmatched: list[str] = []
    for label, one in entries:
        # which modules does the entry *name* (target rule), and which targets does PEFT treat as ff (ff rule)
        named = [n for n in universe if n in mods and _target_matches(one, n)]
        as_ff = [n for n in targeted if _ff_matches(one, n)]
        if any(n not in targeted_set for n in named):
            not_subset.append(label)
        elif not as_ff:
            unmatched.append(label)
    if not_subset:
        raise RecipeError(
            key,
            f"{', '.join(repr(e) for e in not_subset)} selects modules that are not targets; feed-forward modules "
            "must be a subset of target_modules",
            "add them to adapter.target_modules, or drop them from feedforward_modules",
        )
    if unmatched:
        raise RecipeError(
            key,
            f"entry {', '.join(repr(e) for e in unmatched)} matches no targeted module",
            "see `ia3 inspect-modules`",
        )
    return spec


def _lint(
    targeted: list[str], ff_names: list[str], ff_spec: list[str] | str, mods: dict[str, _Module], inter: int | None
) -> tuple[list[str], list[str]]:
    """Warnings (and notes) for explicit targets: feed-forward modules that are not down-projections, the reverse,
    and queries scaled instead of keys."""
    warnings: list[str] = []
    notes: list[str] = []
    ff_set = set(ff_names)
    downs = [n for n in targeted if mods[n].role == "ffn_down"]
    all_downs = [n for n, m in mods.items() if m.role == "ffn_down"]
    wrong_ff = [n for n in ff_names if inter is not None and mods[n].in_features != inter]
    if wrong_ff:
        fix = f"; the down-projection is {', '.join(_shorts(all_downs))}" if all_downs else ""
        warnings.append(
            f"feed-forward {', '.join(_shorts(wrong_ff))} has in_features {mods[wrong_ff[0]].in_features}, not the "
            f"intermediate size {inter}: IA3 scales the input of feed-forward modules, which should be the "
            f"intermediate activation{fix} (target it and list it in feedforward_modules)."
        )
    not_ff_downs = [n for n in downs if n not in ff_set]
    if not_ff_downs:
        warnings.append(
            f"{', '.join(_shorts(not_ff_downs))} is an FFN down-projection targeted without being feed-forward: "
            "IA3 scales its output, not the intermediate activation; add it to feedforward_modules."
        )
    if isinstance(ff_spec, list):
        dotted = {n for n in targeted if any(_dotted_match(e, n) for e in ff_spec)}
        surprise = [n for n in ff_names if n not in dotted]
        if surprise:
            warnings.append(
                f"PEFT matches feed-forward entries as plain suffixes, so {', '.join(_shorts(surprise))} is treated "
                "as feed-forward too; use longer suffixes or a regex."
            )
    roles = {mods[n].role for n in targeted}
    if "attn_q" in roles and "attn_k" not in roles and "attn_qkv_fused" not in roles:
        q = _shorts([n for n in targeted if mods[n].role == "attn_q"])
        k = _shorts([n for n, m in mods.items() if m.role == "attn_k"])
        notes.append(
            f"targets scale queries ({', '.join(q)}) but not keys"
            + (f" ({', '.join(k)})" if k else "")
            + ": the IA3 paper scales keys and values."
        )
    return warnings, notes


def plan_for_model(
    model: torch.nn.Module,
    config: PretrainedConfig,
    task: str,
    adapter: AdapterSection | None = None,
    *,
    use_family_table: bool = True,
) -> TargetPlan:
    """Plan IA3 targets on an already built model (meta or real, quantised or not).

    Args:
        model: The task model (module names must be the ones PEFT will see).
        config: Its config.
        task: ``seq-cls``, ``causal-lm`` or ``seq2seq``.
        adapter: The recipe's adapter section; None (or ``auto`` for both keys) recommends the paper recipe.
        use_family_table: False forces shape analysis, as for a family ia3cli does not know.

    Raises:
        RecipeError: on ``adapter.target_modules`` / ``adapter.feedforward_modules`` for entries that match no
            module, match a non-linear module, or feed-forward entries that are not targets.
    """
    return _make_plan(model, config, task, adapter, use_family_table)


def recommend(model: ModelSection, task: str | None = None, num_labels: int = 2) -> TargetPlan:
    """The paper recipe from the config alone: keys, values and the FFN down-projection (feed-forward).

    Where keys and values live in a fused QKV module, that module is recommended and a warning says Q is scaled too.
    Notes say how PEFT's built-in default for the family differs.

    Args:
        model: The recipe's model section.
        task: The head to plan for; None picks seq2seq for encoder-decoders, seq-cls for encoder-only families and
            causal-lm otherwise. Module names (hence regexes) depend on it.
        num_labels: Classes of a seq-cls head.

    Raises:
        RecipeError: when the config cannot be loaded (``model.name``) or has no model for the task (``model.task``).
    """
    config = load_config(model)
    task = task or _default_task(config)
    meta = build_meta_model(config, task, num_labels, trust_remote_code=model.trust_remote_code)
    return _make_plan(meta, config, task, None, True)


def resolve(model: ModelSection, adapter: AdapterSection, task: str, num_labels: int = 2) -> TargetPlan:
    """The targets a recipe will train, checked on the meta model.

    ``auto`` for both keys is :func:`recommend`. Explicit entries must each match at least one linear-like module
    (list: ``name == entry`` or ``name.endswith('.' + entry)``; a string: one regex, ``re.fullmatch`` on full names).
    Feed-forward modules must be targets. With explicit targets and ``feedforward_modules: auto`` the feed-forward
    modules are the recommended ones (FFN down-projections) among the targets; with ``target_modules: auto`` and an
    explicit feed-forward list, the targets are the recommended ones. Warnings flag feed-forward modules whose input
    is not the intermediate activation (DistilBERT ``lin1`` instead of ``lin2``), down-projections not marked
    feed-forward, and queries scaled instead of keys.

    Args:
        model: The recipe's model section.
        adapter: The recipe's adapter section.
        task: ``seq-cls``, ``causal-lm`` or ``seq2seq``.
        num_labels: Classes of a seq-cls head.

    Raises:
        RecipeError: on ``model.name``/``model.task`` when the model cannot be built; on ``adapter.target_modules``
            naming each entry that matches no (linear) module, with close names; on
            ``adapter.feedforward_modules`` naming entries that are not targets.
    """
    config = load_config(model)
    meta = build_meta_model(config, task, num_labels, trust_remote_code=model.trust_remote_code)
    return _make_plan(meta, config, task, adapter, True)


# ---------------------------------------------------------------------------------------------------------------
# output


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render(plan: TargetPlan, width: int = 100) -> str:
    """The human output of ``ia3 inspect-modules`` (plain text, fits ``width`` columns).

    Args:
        plan: A plan from :func:`recommend` or :func:`resolve`.
        width: Line width to wrap notes and warnings at.
    """
    import textwrap

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
