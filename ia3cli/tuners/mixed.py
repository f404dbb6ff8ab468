"""N IA3 adapters on one base model: each row of a batch uses its own adapter's vectors in one forward.

PEFT applies one active adapter (or a product of several) to the whole batch of an IA3 model, so serving many
adapters would mean switching them per request. An IA3 adapter is a vector per targeted module, so a mixed batch
costs one gather per module:

1. The *plain* base model is loaded as the first run trained it (its ``recipe.yaml``), and each module that run
   targets gets hooks. The module keeps its place in the tree; without a :meth:`MixedIA3.select` block the model
   is the unchanged base.
2. Every targeted module holds a stack ``[slots, features]`` of float32 vectors (PEFT keeps IA3 vectors in float32
   too); slot 0 is all ones, the base. Registering an adapter fills a free slot in every stack.
3. ``select(adapters)`` sets a per-row slot index (thread-local). In each targeted module the hooks gather
   ``stack[index]`` -> ``[batch, features]`` and broadcast it over ``(batch, seq, features)`` exactly as PEFT's
   ``ia3.Linear`` (also for GPT-2's ``Conv1D``) and ``ia3.bnb.Linear4bit``/``Linear8bitLt`` do: feed-forward
   modules scale their *input*, the others (keys, values) their *output*; bitsandbytes layers get a float32
   input, as PEFT's wrappers give them. When every row uses one adapter the 1-D vector is used as is.
4. Heads saved with an adapter (``modules_to_save``: a seq-cls ``classifier``/``score``/...) are kept per adapter;
   rows are grouped by adapter and each group runs through its adapter's copy of the head.

Generation: ``model.generate`` keeps the batch dimension (``num_beams=1``) and keys/values are scaled when they are
projected, so the key/value cache holds scaled values and each decoding step scales only its new token. A batch
expanded by ``num_return_sequences``/``num_beams`` (``repeat_interleave``, rows stay in blocks) is followed too.

One ``select`` block per thread at a time; do not ``add``/``remove`` an adapter that a running forward selected.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ia3cli.errors import Ia3Error

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ia3cli.config.recipe import Recipe

PREFIX = "base_model.model."
VECTOR_SUFFIX = ".ia3_l"
RUN_HINT = "pass the output_dir of a finished `ia3 train` (adapter_config.json, adapter_model.safetensors, recipe.yaml)"


@dataclass
class _Target:
    """One targeted module: its stack of per-adapter vectors (row = slot) and which side it scales."""

    name: str
    is_feedforward: bool
    is_bnb: bool
    stack: torch.Tensor  # [slots, features], float32, on the module's device


@dataclass
class _Head:
    """One module saved with the adapters (``modules_to_save``): each adapter's parameters for it, by slot."""

    name: str
    module: torch.nn.Module
    params: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class _Adapter:
    """A registered adapter: its slot, recipe, where it came from and what it holds."""

    slot: int
    recipe: Recipe
    run_dir: Path
    nbytes: int


class _Selection(threading.local):
    """The per-row slot index of the running ``select`` block (one per thread)."""

    index: torch.Tensor | None = None  # [batch] long, on the CPU
    uniform: int | None = None  # the slot when every row uses the same one
    on_device: dict[Any, torch.Tensor] | None = None
    in_head: bool = False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_adapter(name: str, run_dir: Path) -> tuple[Recipe, dict[str, Any], dict[str, torch.Tensor]]:
    """The recipe, adapter config and tensors of a run dir.

    Raises:
        Ia3Error: naming the adapter when a file is missing or unreadable.
    """
    from ia3cli.config.load import load_recipe

    if not run_dir.is_dir():
        raise Ia3Error(f"adapter '{name}': run directory not found: {run_dir}", RUN_HINT)
    for needed in ("adapter_config.json", "recipe.yaml"):
        if not (run_dir / needed).is_file():
            raise Ia3Error(f"adapter '{name}': {run_dir} has no {needed} (not a finished run dir)", RUN_HINT)
    try:
        config = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Ia3Error(
            f"adapter '{name}': {run_dir / 'adapter_config.json'} is unreadable: {_first_line(exc)}"
        ) from None
    if not isinstance(config, dict) or config.get("peft_type") != "IA3":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise Ia3Error(f"adapter '{name}': {run_dir} holds a {kind} adapter, not IA3", RUN_HINT)
    try:
        recipe = load_recipe(run_dir / "recipe.yaml")
    except Ia3Error as exc:
        raise Ia3Error(f"adapter '{name}': {exc.message}", exc.hint) from None
    weights = run_dir / "adapter_model.safetensors"
    try:
        if weights.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(weights), device="cpu")
        elif (run_dir / "adapter_model.bin").is_file():
            weights = run_dir / "adapter_model.bin"
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            raise Ia3Error(f"adapter '{name}': {run_dir} has no adapter_model.safetensors", RUN_HINT)
    except Ia3Error:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise Ia3Error(f"adapter '{name}': {weights} is corrupt: {_first_line(exc)}", RUN_HINT) from None
    return recipe, config, tensors


def _base_identity(recipe: Recipe) -> tuple[str, str | None, str | None]:
    """What names the base weights: the resolved model name (a local folder as an absolute path), revision, GGUF."""
    from ia3cli.config.paths import resolve_model_path

    name = recipe.model.name
    try:
        path = Path(resolve_model_path(name))
        if path.is_dir():
            name = str(path.resolve())
    except Ia3Error:
        pass
    return name, recipe.model.revision, recipe.model.gguf_file


class MixedIA3:
    """N IA3 adapters on one base model; each row of a batch uses its own adapter's vectors in one forward.

    Build it with :meth:`from_run`; register more adapters with :meth:`add`; run forwards (or ``generate``) inside
    :meth:`select`.

    Attributes:
        model: The base, with hooks installed on the targeted modules (a plain model outside ``select``).
        tokenizer: The first run's tokenizer.
        task: ``seq-cls``, ``causal-lm`` or ``seq2seq``.
        base_name: ``recipe.model.name`` of the base.
        recipe: The first adapter's recipe (prompt template, label names, ...).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.task: str = recipe.model.task
        self.base_name: str = recipe.model.name
        self._identity = _base_identity(recipe)
        self._targets: dict[str, _Target] = {}
        self._heads: dict[str, _Head] = {}
        self._adapters: dict[str, _Adapter] = {}
        self._free: list[int] = []
        self._capacity = 1  # slot 0 is the base
        self._selection = _Selection()
        self._modules = dict(model.named_modules())
        self._hooks: list[Any] = []

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_run(cls, run_dir: Path, *, quantization: str | None = None, name: str | None = None) -> MixedIA3:
        """Load the base exactly as that run trained it and register the run as an adapter named after its folder.

        Args:
            run_dir: Output dir of ``ia3 train``.
            quantization: ``none``, ``4bit`` or ``8bit`` to override the run's ``model.quantization``.
            name: Register the run under this name instead of its folder name.

        Raises:
            Ia3Error: when the run dir is incomplete or its base cannot be loaded.
        """
        from ia3cli.models import loading as modeling
        from ia3cli.tuners import ia3

        run_dir = Path(run_dir)
        name = name or run_dir.resolve().name
        recipe, config, tensors = _read_adapter(name, run_dir)
        tokenizer = ia3.load_run_tokenizer(run_dir, recipe)
        if quantization is not None:
            recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": quantization})})
        model = modeling.load_recipe_base(recipe, tokenizer)
        model.eval()
        mixed = cls(model, tokenizer, recipe)
        mixed._install(name, config, tensors)
        mixed._register(name, run_dir, recipe, config, tensors)
        return mixed

    def _install(self, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Hook every module the first adapter targets and every head it saved."""
        from transformers.pytorch_utils import Conv1D

        for module_name, value in _vectors(tensors).items():
            module = self._modules.get(module_name)
            if not isinstance(module, (torch.nn.Linear, Conv1D)):  # bitsandbytes layers subclass nn.Linear
                what = f"a {type(module).__name__}" if module is not None else "no module"
                raise Ia3Error(
                    f"adapter '{name}': its vector for {module_name} scales {what} of {self.base_name}",
                    "mixed batches support IA3 on linear layers (nn.Linear, Conv1D, bitsandbytes 4/8-bit)",
                )
            is_ff = _is_feedforward(value)
            stack = torch.ones((1, value.numel()), dtype=torch.float32, device=_module_device(module))
            is_bnb = type(module).__name__ in ("Linear4bit", "Linear8bitLt")
            target = _Target(module_name, is_ff, is_bnb, stack)
            self._targets[module_name] = target
            if is_ff or is_bnb:
                self._hooks.append(module.register_forward_pre_hook(self._pre_hook(target), with_kwargs=True))
            if not is_ff:
                self._hooks.append(module.register_forward_hook(self._post_hook(target)))
        for head_name in self._head_names(name, config, tensors):
            head = _Head(head_name, self._modules[head_name])
            self._heads[head_name] = head
            self._hooks.append(head.module.register_forward_hook(self._head_hook(head), with_kwargs=True))

    def _head_names(self, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
        """Modules whose parameters an adapter saved in full (``modules_to_save``), as base module names."""
        saved = config.get("modules_to_save") or []
        names: list[str] = []
        heads = [m for m in self._modules if m and any(m == s or m.endswith("." + s) for s in saved)]
        for key in tensors:
            if key.endswith(VECTOR_SUFFIX):
                continue
            owner = next((m for m in heads if key.removeprefix(PREFIX).startswith(m + ".")), None)
            if owner is None:
                raise Ia3Error(
                    f"adapter '{name}': tensor {key} belongs to no module in modules_to_save {saved}",
                    "only IA3 vectors and modules_to_save can be served side by side",
                )
            if owner not in names:
                names.append(owner)
        return sorted(names)

    # ---------------------------------------------------------------- registry

    def add(self, name: str, run_dir: Path) -> None:
        """Register an adapter (adapter_config.json + adapter_model.safetensors + recipe.yaml of a run dir).

        Re-adding an existing name replaces it (only once the new one has been read and checked).

        Args:
            name: The name rows select it by.
            run_dir: Output dir of ``ia3 train``.

        Raises:
            Ia3Error: naming the adapter when its base model, task, targets or head shapes differ from the base's,
                or when its files are missing or corrupt.
        """
        run_dir = Path(run_dir)
        recipe, config, tensors = _read_adapter(name, run_dir)
        self._register(name, run_dir, recipe, config, tensors)

    def _check_compatible(self, name: str, recipe: Recipe, config: dict[str, Any], tensors: dict) -> None:
        if _base_identity(recipe) != self._identity:
            raise Ia3Error(
                f"adapter '{name}' was trained on base model '{recipe.model.name}', not '{self.base_name}'",
                "serve adapters of one base model together; start another instance for another base",
            )
        if recipe.model.task != self.task:
            raise Ia3Error(
                f"adapter '{name}' is a {recipe.model.task} adapter; this base serves {self.task}",
                "adapters of one task share a batch; start another instance for another task",
            )
        if self.task == "seq-cls" and recipe.num_labels != self.recipe.num_labels:
            raise Ia3Error(
                f"adapter '{name}' has {recipe.num_labels} classes; the adapters here have {self.recipe.num_labels}",
                "adapters with different numbers of classes cannot share a batch",
            )
        vectors = _vectors(tensors)
        if set(vectors) != set(self._targets):
            extra, missing = sorted(set(vectors) - set(self._targets)), sorted(set(self._targets) - set(vectors))
            shown = f"also targets {', '.join(extra[:3])}" if extra else f"does not target {', '.join(missing[:3])}"
            raise Ia3Error(
                f"adapter '{name}' targets other modules than the first adapter ({shown})",
                "adapters served together must be trained with the same adapter.target_modules",
            )
        for module_name, v in vectors.items():
            target = self._targets[module_name]
            if v.numel() != target.stack.shape[1] or _is_feedforward(v) != target.is_feedforward:
                raise Ia3Error(
                    f"adapter '{name}': the vector of {module_name} has shape {tuple(v.shape)}, "
                    f"the first adapter's is {'(1, n)' if target.is_feedforward else '(n, 1)'} "
                    f"with n={target.stack.shape[1]}",
                    "adapters served together must be trained with the same target and feed-forward modules",
                )
        heads = self._head_names(name, config, tensors)
        if heads != sorted(self._heads):
            raise Ia3Error(
                f"adapter '{name}' saves the modules {heads}, the first adapter {sorted(self._heads)}",
                "adapters served together must save the same modules_to_save",
            )

    def _register(self, name: str, run_dir: Path, recipe: Recipe, config: dict, tensors: dict) -> None:
        self._check_compatible(name, recipe, config, tensors)
        head_params: dict[str, dict[str, torch.Tensor]] = {}
        for head_name, head in self._heads.items():
            own = dict(head.module.named_parameters())
            params = {}
            for pname, p in own.items():
                key = f"{PREFIX}{head_name}.{pname}"
                if key not in tensors or tensors[key].shape != p.shape:
                    got = tuple(tensors[key].shape) if key in tensors else "missing"
                    raise Ia3Error(
                        f"adapter '{name}': head parameter {head_name}.{pname} is {got}, "
                        f"the base needs {tuple(p.shape)}",
                        "adapters served together must share the base's head shape (model.num_labels)",
                    )
                params[pname] = tensors[key].to(device=p.device, dtype=p.dtype)
            head_params[head_name] = params
        old = self._adapters.get(name)
        slot = old.slot if old is not None else self._take_slot()
        nbytes = 0
        for module_name, target in self._targets.items():
            v = tensors[PREFIX + module_name + VECTOR_SUFFIX].flatten().to(torch.float32)
            target.stack[slot] = v.to(target.stack.device)
            nbytes += v.numel() * 4
        for head_name, params in head_params.items():
            self._heads[head_name].params[slot] = params
            nbytes += sum(t.numel() * t.element_size() for t in params.values())
        self._adapters[name] = _Adapter(slot, recipe, run_dir, nbytes)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._capacity
        grow = max(1, self._capacity)  # double: registering thousands of adapters copies each vector O(log n) times
        for target in self._targets.values():
            extra = torch.ones((grow, target.stack.shape[1]), dtype=target.stack.dtype, device=target.stack.device)
            target.stack = torch.cat([target.stack, extra])
        self._free = list(range(self._capacity + grow - 1, slot, -1))
        self._capacity += grow
        return slot

    def remove(self, name: str) -> None:
        """Unregister an adapter and free its slot.

        Raises:
            Ia3Error: when no adapter has that name.
        """
        adapter = self._get(name)
        for target in self._targets.values():
            target.stack[adapter.slot] = 1.0
        for head in self._heads.values():
            head.params.pop(adapter.slot, None)
        del self._adapters[name]
        self._free.append(adapter.slot)

    def names(self) -> list[str]:
        """Registered adapter names, in registration order."""
        return list(self._adapters)

    def nbytes(self, name: str) -> int:
        """Bytes of that adapter's tensors in memory (its vectors and head copies)."""
        return self._get(name).nbytes

    def adapter_recipe(self, name: str) -> Recipe:
        """The recipe the adapter was trained with (prompt template, label names, ...)."""
        return self._get(name).recipe

    def adapter_dir(self, name: str) -> Path:
        """The run dir the adapter was read from."""
        return self._get(name).run_dir

    def _get(self, name: str) -> _Adapter:
        if name not in self._adapters:
            known = ", ".join(self._adapters) or "none"
            raise Ia3Error(f"unknown adapter '{name}' (registered: {known})", "register it first")
        return self._adapters[name]

    # ---------------------------------------------------------------- forward

    @contextlib.contextmanager
    def select(self, adapters: Sequence[str | None]) -> Iterator[None]:
        """For forwards inside the block, row i of the batch uses adapter ``adapters[i]`` (``None``: the base).

        Works for ``model(**batch)`` and ``model.generate(**batch)`` with ``num_beams=1`` (greedy or sampling).

        Raises:
            Ia3Error: for an unknown adapter name (before anything runs).
        """
        slots = [0 if a is None else self._get(a).slot for a in adapters]
        sel = self._selection
        saved = (sel.index, sel.uniform, sel.on_device)
        sel.index = torch.tensor(slots, dtype=torch.long)
        sel.uniform = slots[0] if slots and all(s == slots[0] for s in slots) else None
        sel.on_device = {}
        try:
            yield
        finally:
            sel.index, sel.uniform, sel.on_device = saved

    def _rows(self, x: torch.Tensor, target: _Target) -> torch.Tensor | None:
        """The scaling for ``x`` ([batch, ..., features]): ``None`` for the base, else a broadcastable tensor.

        Raises:
            Ia3Error: for rows of different adapters reaching a module inside mixture-of-experts routing.
        """
        sel, stack = self._selection, target.stack
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
        return stack[_expand(index, x.shape[0])].view(x.shape[0], *([1] * (x.dim() - 2)), stack.shape[1])

    def _pre_hook(self, target: _Target) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            key = None if args else next(iter(kwargs))  # the input, passed by position or by name
            x = given = args[0] if args else kwargs[key]
            scale = self._rows(x, target)
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

    def _post_hook(self, target: _Target) -> Any:
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            scale = self._rows(out, target)
            if scale is None:
                return None
            if target.is_bnb and torch.is_autocast_enabled():
                return out * scale
            return (out * scale).to(out.dtype)

        return hook

    def _head_hook(self, head: _Head) -> Any:
        from torch.func import functional_call

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor | None:
            sel = self._selection
            if sel.index is None or sel.uniform == 0 or sel.in_head:
                return None
            sel.in_head = True
            try:
                if sel.uniform is not None:
                    return functional_call(module, head.params[sel.uniform], args, kwargs)
                index = _expand(sel.index, out.shape[0])
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


def _vectors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The IA3 vectors of an adapter's tensors, by the base module they scale."""
    return {
        k.removeprefix(PREFIX).removesuffix(VECTOR_SUFFIX): v for k, v in tensors.items() if k.endswith(VECTOR_SUFFIX)
    }


def _is_feedforward(vector: torch.Tensor) -> bool:
    # PEFT shapes an IA3 vector (1, in_features) for feed-forward modules and (out_features, 1) otherwise
    return vector.dim() == 2 and vector.shape[0] == 1 and vector.shape[1] != 1


def _expand(index: torch.Tensor, batch: int) -> torch.Tensor:
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


def _module_device(module: Any) -> Any:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
