"""The forward hooks of :class:`ia3cli.tuners.mixed.MixedIA3`: per-row IA3 scaling gathered from a stack of vectors,
and per-adapter heads, as PEFT's ``ia3.Linear`` (and its bitsandbytes wrappers) would apply one adapter."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ia3cli.errors import Ia3Error


@dataclass
class Target:
    """One targeted module: its stack of per-adapter vectors (row = slot) and which side it scales."""

    name: str
    is_feedforward: bool
    is_bnb: bool
    stack: torch.Tensor  # [slots, features], float32, on the module's device


@dataclass
class Head:
    """One module saved with the adapters (``modules_to_save``): each adapter's parameters for it, by slot."""

    name: str
    module: torch.nn.Module
    params: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class Selection(threading.local):
    """The per-row slot index of the running ``select`` block (one per thread)."""

    index: torch.Tensor | None = None  # [batch] long, on the CPU
    uniform: int | None = None  # the slot when every row uses the same one
    on_device: dict[Any, torch.Tensor] | None = None
    in_head: bool = False


def rows(sel: Selection, x: torch.Tensor, target: Target) -> torch.Tensor | None:
    """The scaling for ``x`` ([batch, ..., features]): ``None`` for the base, else a broadcastable tensor.

    Raises:
        Ia3Error: for rows of different adapters reaching a module inside mixture-of-experts routing.
    """
    stack = target.stack
    if sel.index is None or sel.uniform == 0:
        return None
    if sel.uniform is not None:
        return stack[sel.uniform]
    if ".experts." in f".{target.name}.":  # an expert sees a routed subset of tokens: rows are lost
        raise Ia3Error(
            f"{target.name} is a mixture-of-experts module; its tokens cannot be traced back to rows",
            "give every row of a batch the same adapter for this model",
        )
    index = sel.on_device.get(stack.device)
    if index is None:
        index = sel.on_device[stack.device] = sel.index.to(stack.device)
    return stack[expand(index, x.shape[0])].view(x.shape[0], *([1] * (x.dim() - 2)), stack.shape[1])


def pre_hook(sel: Selection, target: Target) -> Any:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        key = None if args else next(iter(kwargs))  # the input, passed by position or by name
        x = given = args[0] if args else kwargs[key]
        scale = rows(sel, x, target)
        if scale is None:
            return None
        if target.is_bnb:  # as peft.tuners.ia3.bnb: the 4/8-bit layer gets a float32 input
            if not torch.is_autocast_enabled() and x.dtype != torch.float32:
                x = x.float()
            if target.is_feedforward:
                x = x * scale
        else:  # as peft.tuners.ia3.layer.Linear
            x = (x.to(scale.dtype) * scale).to(given.dtype)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, key: x})

    return hook


def post_hook(sel: Selection, target: Target) -> Any:
    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        scale = rows(sel, out, target)
        if scale is None:
            return None
        if target.is_bnb and torch.is_autocast_enabled():
            return out * scale
        return (out * scale).to(out.dtype)

    return hook


def head_hook(sel: Selection, head: Head) -> Any:
    from torch.func import functional_call

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor | None:
        if sel.index is None or sel.uniform == 0 or sel.in_head:
            return None
        sel.in_head = True
        try:
            if sel.uniform is not None:
                return functional_call(module, head.params[sel.uniform], args, kwargs)
            index = expand(sel.index, out.shape[0])
            result = out.clone()
            for slot in index.unique().tolist():
                if slot == 0:
                    continue
                rows = (index == slot).nonzero().flatten().to(out.device)
                part = tuple(a.index_select(0, rows) if torch.is_tensor(a) else a for a in args)
                part_kwargs = {k: v.index_select(0, rows) if torch.is_tensor(v) else v for k, v in kwargs.items()}
                result[rows] = functional_call(module, head.params[slot], part, part_kwargs)
            return result
        finally:
            sel.in_head = False

    return hook


def expand(index: torch.Tensor, batch: int) -> torch.Tensor:
    """The per-row index for a batch of ``batch`` rows (``generate`` repeats each row for beams/return sequences).

    Raises:
        Ia3Error: when the batch is not a whole multiple of the selected rows.
    """
    if batch == index.shape[0]:
        return index
    if batch % index.shape[0]:
        raise Ia3Error(
            f"a forward saw a batch of {batch} rows inside select() over {index.shape[0]} rows",
            "pass one adapter name per row of the batch",
        )
    return index.repeat_interleave(batch // index.shape[0])


def module_device(module: Any) -> Any:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
