"""A model's module tree as the target plan sees it: every linear-like module with its shape and role.

Roles come from the family table (:mod:`ia3cli.config.families`) or, for families it does not know, from shapes
(hidden and intermediate sizes) and name hints. The paper's selection (keys, values, the FFN down-projection), the
per-module table of ``ia3 inspect-modules`` and the adapter's size are computed here. Runs on a ``meta``-device
model: no weights. Torch is imported inside functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ia3cli.config.families import (
    ATTENTION_OUTPUT_NAMES,
    GATE_NAME,
    GENERIC_INTERMEDIATE_KEYS,
    NAME_HINTS,
    Family,
    in_block,
    role_in,
)
from ia3cli.models.advice import shorts
from ia3cli.models.matching import Module, pattern

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig


def scan(model: torch.nn.Module) -> tuple[list[str], dict[str, Module]]:
    """All module names (PEFT matches against every one) and the wrappable ones with their shapes."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names: list[str] = []
    found: dict[str, Module] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        names.append(name)
        if isinstance(module, torch.nn.Linear):  # includes bitsandbytes Linear4bit / Linear8bitLt
            found[name] = Module(name, type(module).__name__, module.in_features, module.out_features, True)
        elif isinstance(module, Conv1D):  # weight stored as (in, out)
            n_in, n_out = module.weight.shape
            found[name] = Module(name, "Conv1D", int(n_in), int(n_out), True)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            kind = type(module).__name__
            found[name] = Module(name, kind, module.in_channels, module.out_channels, False)
    return names, found


def head_roots(model: torch.nn.Module, task: str) -> tuple[set[str], list[str]]:
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


def is_under(name: str, roots: Iterable[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def assign_roles_family(mods: dict[str, Module], roles: dict[str, str]) -> None:
    for m in mods.values():
        if m.role == "other" and in_block(m.name):
            m.role = role_in(roles, m.name) or "other"


def assign_roles_shapes(mods: dict[str, Module], hidden: int | None, inter: int | None) -> None:
    """Roles for an unknown family: the down-projection by shape (in == intermediate), the rest by name hints."""
    for m in mods.values():
        if m.role != "other" or not in_block(m.name):
            continue
        last = m.name.rsplit(".", 1)[-1].lower()
        context = ".".join(m.name.lower().split(".")[-3:-1])  # parent and grandparent
        if inter and hidden and inter != hidden:
            if m.in_features == inter and m.out_features == hidden:
                m.role = "ffn_down"
                continue
            if m.in_features == hidden and m.out_features == inter:
                m.role = "ffn_gate" if GATE_NAME.fullmatch(last) else "ffn_up"
                continue
        for role, hint in NAME_HINTS:
            if hint.fullmatch(last):
                # "dense"/"output"/"wo"/"c_proj" are attention outputs only under an attention parent
                if role == "attn_o" and "att" not in context and last not in ATTENTION_OUTPUT_NAMES:
                    continue
                m.role = role
                break


def sizes(config: PretrainedConfig, mods: dict[str, Module], family: Family | None) -> tuple[int | None, int | None]:
    """Hidden size and FFN intermediate size: from the config keys the family table names when the shapes confirm
    them, else from the shapes."""
    block = [m for m in mods.values() if in_block(m.name) and m.linear]
    hidden = getattr(config, family.hidden_key if family else "hidden_size", None)
    if not isinstance(hidden, int):
        hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        counts = Counter(m.out_features for m in block)
        hidden = counts.most_common(1)[0][0] if counts else None
    inter = None
    for key in family.intermediate_keys if family else GENERIC_INTERMEDIATE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            inter = value
            break
    if inter is None and family is not None and family.ffn_multiple and isinstance(hidden, int):
        inter = family.ffn_multiple * hidden
    if inter is not None and not any(m.in_features == inter for m in block):
        inter = None  # the config's number is not what the modules show (e.g. MoE, per-layer sizes)
    if inter is None and hidden is not None:
        counts = Counter(m.in_features for m in block if m.out_features == hidden and m.in_features != hidden)
        inter = counts.most_common(1)[0][0] if counts else None
    return hidden, inter


def table(mods: dict[str, Module], targeted: set[str], ff: set[str]) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for m in mods.values():
        key = (pattern(m.name), m.kind, m.in_features, m.out_features, m.role)
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


def safetensors_bytes(shapes: dict[str, tuple[int, int]], itemsize: int, dtype: str) -> int:
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


def counts(mods: dict[str, Module], targeted: list[str], ff: set[str]) -> tuple[int, int, int, int]:
    ia3 = sum(mods[n].in_features if n in ff else mods[n].out_features for n in targeted)
    lora = sum(8 * (mods[n].in_features + mods[n].out_features) for n in targeted)
    # PEFT saves "base_model.model.<name>.ia3_l", shaped (1, in) for feed-forward targets and (out, 1) otherwise
    shapes = {
        f"base_model.model.{n}.ia3_l": (1, mods[n].in_features) if n in ff else (mods[n].out_features, 1)
        for n in targeted
    }
    return ia3, lora, safetensors_bytes(shapes, 4, "F32"), safetensors_bytes(shapes, 2, "F16")


def paper_selection(mods: dict[str, Module]) -> tuple[list[str], list[str], list[str]]:
    """Keys, values (or the fused QKV module) and down-projections, in model order; plus warnings."""
    warnings: list[str] = []
    block = [m for m in mods.values() if in_block(m.name)]
    kv = [m.name for m in block if m.role in ("attn_k", "attn_v")]
    fused = [m.name for m in block if m.role == "attn_qkv_fused"]
    if fused:
        warnings.append(
            f"keys and values live in a fused module ({', '.join(shorts(fused))}): IA3 on it scales the queries "
            "too (one vector over Q, K and V), close to but not exactly the paper's recipe."
        )
    down = [m.name for m in block if m.role == "ffn_down"]
    chosen = set(kv) | set(fused) | set(down)
    targets = [m.name for m in mods.values() if m.name in chosen]
    if not kv and not fused:
        warnings.append(
            "found no key/value projections; set adapter.target_modules explicitly (see `ia3 inspect-modules`)."
        )
    if not down:
        warnings.append("found no FFN down-projection; IA3 will scale attention only (no feed-forward vector).")
    return targets, down, warnings
