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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ia3cli.errors import Ia3Error
from ia3cli.tuners.adapter_files import (
    PREFIX,
    VECTOR_SUFFIX,
    base_identity,
    is_feedforward,
    read_adapter,
    vectors,
)
from ia3cli.tuners.mixed_hooks import Head, Selection, Target, head_hook, module_device, post_hook, pre_hook

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ia3cli.config.recipe import Recipe


@dataclass
class _Adapter:
    """A registered adapter: its slot, recipe, where it came from and what it holds."""

    slot: int
    recipe: Recipe
    run_dir: Path
    nbytes: int


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
        self._identity = base_identity(recipe)
        self._targets: dict[str, Target] = {}
        self._heads: dict[str, Head] = {}
        self._adapters: dict[str, _Adapter] = {}
        self._free: list[int] = []
        self._capacity = 1  # slot 0 is the base
        self._selection = Selection()
        self._modules = dict(model.named_modules())
        self._hooks: list[Any] = []

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_run(
        cls, run_dir: Path, *, quantization: str | None = None, name: str | None = None, device: str | None = None
    ) -> MixedIA3:
        """Load the base exactly as that run trained it and register the run as an adapter named after its folder.

        Args:
            run_dir: Output dir of ``ia3 train``.
            quantization: ``none``, ``4bit`` or ``8bit`` to override the run's ``model.quantization``.
            name: Register the run under this name instead of its folder name.
            device: A ``--device`` value (see :mod:`ia3cli.models.device`); ``None``: as ``from_pretrained`` loads.

        Raises:
            Ia3Error: when the run dir is incomplete or its base cannot be loaded.
        """
        from ia3cli.models import loading as modeling
        from ia3cli.tuners import ia3

        run_dir = Path(run_dir)
        name = name or run_dir.resolve().name
        recipe, config, tensors = read_adapter(name, run_dir)
        tokenizer = ia3.load_run_tokenizer(run_dir, recipe)
        if quantization is not None:
            recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": quantization})})
        model = modeling.load_recipe_base(recipe, tokenizer, device)
        model.eval()
        mixed = cls(model, tokenizer, recipe)
        mixed._install(name, config, tensors)
        mixed._register(name, run_dir, recipe, config, tensors)
        return mixed

    def _install(self, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Hook every module the first adapter targets and every head it saved."""
        from transformers.pytorch_utils import Conv1D

        for module_name, value in vectors(tensors).items():
            module = self._modules.get(module_name)
            if not isinstance(module, (torch.nn.Linear, Conv1D)):  # bitsandbytes layers subclass nn.Linear
                what = f"a {type(module).__name__}" if module is not None else "no module"
                raise Ia3Error(
                    f"adapter '{name}': its vector for {module_name} scales {what} of {self.base_name}",
                    "mixed batches support IA3 on linear layers (nn.Linear, Conv1D, bitsandbytes 4/8-bit)",
                )
            is_ff = is_feedforward(value)
            stack = torch.ones((1, value.numel()), dtype=torch.float32, device=module_device(module))
            is_bnb = type(module).__name__ in ("Linear4bit", "Linear8bitLt")
            target = Target(module_name, is_ff, is_bnb, stack)
            self._targets[module_name] = target
            if is_ff or is_bnb:
                hook = pre_hook(self._selection, target)
                self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if not is_ff:
                self._hooks.append(module.register_forward_hook(post_hook(self._selection, target)))
        for head_name in self._head_names(name, config, tensors):
            head = Head(head_name, self._modules[head_name])
            self._heads[head_name] = head
            self._hooks.append(head.module.register_forward_hook(head_hook(self._selection, head), with_kwargs=True))

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
        recipe, config, tensors = read_adapter(name, run_dir)
        self._register(name, run_dir, recipe, config, tensors)

    def _check_compatible(self, name: str, recipe: Recipe, config: dict[str, Any], tensors: dict) -> None:
        if base_identity(recipe) != self._identity:
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
        found = vectors(tensors)
        if set(found) != set(self._targets):
            extra, missing = sorted(set(found) - set(self._targets)), sorted(set(self._targets) - set(found))
            shown = f"also targets {', '.join(extra[:3])}" if extra else f"does not target {', '.join(missing[:3])}"
            raise Ia3Error(
                f"adapter '{name}' targets other modules than the first adapter ({shown})",
                "adapters served together must be trained with the same adapter.target_modules",
            )
        for module_name, v in found.items():
            target = self._targets[module_name]
            if v.numel() != target.stack.shape[1] or is_feedforward(v) != target.is_feedforward:
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
