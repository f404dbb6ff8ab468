"""The IA3 vectors of a trained model, as the health monitor and the report see them: each vector's group and layer,
per-group gradient norms and drift from initialisation computed with a few grouped tensor ops.

Groups: ``k``, ``v``, ``q`` (attention keys, values, queries), ``qkv`` (fused projections), ``ff`` (feed-forward:
PEFT's ``is_feedforward``), ``other``. Slots: one per group, one per layer, and a spare for vectors outside layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ia3cli.config.families import group_of, role_of

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")
_PEFT_PREFIX = "base_model.model."


def layer_label(name: str) -> str | None:
    """The layer a module belongs to: ``"3"`` for ``...layers.3...``, ``"dec_3"`` in a decoder stack, else ``None``."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        return None
    before = name[: match.start()].lower().split(".")
    return f"dec_{match.group(1)}" if "decoder" in before else match.group(1)


def ia3_parameters(
    model: torch.nn.Module, groups: Mapping[str, str] | None = None
) -> list[tuple[str, torch.nn.Parameter, str, str | None]]:
    """The trainable IA3 vectors of a PEFT model with their group and layer.

    Args:
        model: A ``PeftModel`` (or any module holding PEFT ``IA3Layer`` modules).
        groups: Module name (as in the base model, without PEFT's ``base_model.model.``) -> group, from the target
            plan (``TargetPlan.groups``). Names it lacks get their group from the family table by
            ``model.config.model_type`` and PEFT's ``is_feedforward`` flag.

    Returns:
        ``(module_name, parameter, group, layer)`` for each trainable ``ia3_l`` parameter, in model order.
    """
    modules = dict(model.named_modules())
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    found = []
    for pname, param in model.named_parameters():
        if ".ia3_l." not in pname or not param.requires_grad:
            continue
        mname = pname.split(".ia3_l.")[0]
        group = (groups or {}).get(mname.removeprefix(_PEFT_PREFIX))
        if group is None:
            is_ff = bool(getattr(modules.get(mname), "is_feedforward", False))
            group = group_of(role_of(model_type, mname), is_ff)
        found.append((mname, param, group, layer_label(mname)))
    return found


def all_processes_agree(finite: bool, params: list[torch.nn.Parameter]) -> bool:
    """True when every process saw finite gradients.

    Under DDP the hooks may measure a process's own gradients before they are averaged, so one process can see a
    non-finite step that the others do not; deciding together keeps them from stopping apart (and hanging).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return finite
    device = params[0].device if params else torch.device("cpu")
    flag = torch.tensor([0.0 if finite else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def slot_indices(
    params: list[torch.nn.Parameter],
    groups: list[str],
    layers: list[str | None],
    group_names: list[str],
    layer_names: list[str],
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """``(slots, elem_group, elem_layer, counts)``: parameter -> slot membership (0/1, so that squared norms sum into
    groups and layers in one matmul), each element's group and layer slot, and the element count of each slot."""
    n_groups, n_layers = len(group_names), len(layer_names)
    spare = n_groups + n_layers
    group_idx = torch.tensor([group_names.index(g) for g in groups], device=device)
    layer_idx = torch.tensor(
        [n_groups + layer_names.index(la) if la is not None else spare for la in layers], device=device
    )
    numels = torch.tensor([p.numel() for p in params], device=device)
    elem_group = torch.repeat_interleave(group_idx, numels)
    elem_layer = torch.repeat_interleave(layer_idx, numels)
    counts = torch.zeros(spare + 1, device=device)
    counts.index_add_(0, group_idx, numels.float()).index_add_(0, layer_idx, numels.float())
    slots = torch.zeros(len(params), spare + 1, device=device)
    slots[torch.arange(len(params), device=device), group_idx] = 1.0
    slots[torch.arange(len(params), device=device), layer_idx] = 1.0
    return slots, elem_group, elem_layer, counts.clamp_min(1)


def drift_stats(
    params: list[torch.nn.Parameter], indices: tuple[torch.Tensor, ...], group_names: list[str], layer_names: list[str]
) -> dict[str, float]:
    """Mean ``|l - 1|`` (``drift_<g>``) and the share of entries exactly 1.0 (``at_init_<g>``), per group and per
    layer (``drift_layer_<i>``, ``at_init_layer_<i>``)."""
    _, elem_group, elem_layer, counts = indices
    device = counts.device
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to(device, torch.float32) for p in params])
        dev = (flat - 1.0).abs()
        at_init = (flat == 1.0).float()
        drift = torch.zeros_like(counts).index_add_(0, elem_group, dev).index_add_(0, elem_layer, dev)
        still = torch.zeros_like(counts).index_add_(0, elem_group, at_init).index_add_(0, elem_layer, at_init)
        values = torch.cat([drift / counts, still / counts]).tolist()
    n, n_groups = counts.numel(), len(group_names)
    out: dict[str, float] = {}
    for i, g in enumerate(group_names):
        out[f"drift_{g}"], out[f"at_init_{g}"] = values[i], values[n + i]
    for j, la in enumerate(layer_names):
        out[f"drift_layer_{la}"], out[f"at_init_layer_{la}"] = values[n_groups + j], values[n + n_groups + j]
    return out
