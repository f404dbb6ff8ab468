"""``training.distributed: fsdp``: the frozen base sharded across ranks at load time, and memory per rank.

transformers (5.24) shards a model while it loads when ``from_pretrained`` gets a ``DistributedConfig``: each unit of
its FSDP plan becomes one FSDP2 (``fully_shard``) group whose weights are split along dim 0 across the ranks, and each
rank reads only its own shard from the checkpoint, so no rank ever holds the whole base, in device memory or in CPU
memory. ia3cli makes every block of the model (its ``_no_split_modules``, e.g. ``LlamaDecoderLayer``, ``T5Block``) a
unit; the family's own plan (embeddings, final norm, head) applies on top where it has one, and the root unit takes
whatever is left.

A 4-bit base cannot be sharded while it loads: bitsandbytes packs the weights as they load, and a weight that FSDP
has already split is never packed (it ends up as a plain ``uint8`` DTensor of the unquantised shape). So a 4-bit
base is loaded whole into CPU memory on each rank (packed: about 0.56 bytes a weight), PEFT wraps it, and only then
is each block, and the root, given to ``fully_shard`` (:func:`shard_wrapped`), which moves each block's shards to the
rank's device one block at a time. The packed values are stored as the dtype of the base's other weights
(``bnb_4bit_quant_storage``, as in the FSDP + QLoRA recipe), so each FSDP group gathers one dtype, and FSDP leaves
the trained parameters out (``ignored_params``). bitsandbytes keeps each layer's quantisation state (block scales)
on the module as well as on the weight, and puts it back on the gathered weight at each forward
(``fix_4bit_weight_quant_state_from_module``); ia3cli moves that state to the rank's device. 8-bit weights keep
their state on the weight only, so 8-bit bases are not sharded.

PEFT adds the IA3 vectors after loading, as plain tensors next to the sharded weights: they are never sharded, stay in
float32, and the Trainer keeps them identical on every rank (it broadcasts them from rank 0 and averages their
gradients at the end of each accumulation window, as DDP does). That is why FSDP1's trap with mixed
``requires_grad`` inside one flat parameter (peft#1702), and PEFT's auto-wrap policy that looks for a ``.weight`` on
``ia3_l``, do not arise here: FSDP2 shards per parameter, and only frozen weights are sharded.

The memory estimate is from the config alone (a model on the ``meta`` device): weights per rank, plus the activations
a backward pass through the base keeps at ``max_length`` x ``batch_size`` (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models": ``s*b*h*(34 + 5*a*s/h)`` bytes per layer at 16 bits), plus the
logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ia3cli.env import launched, local_rank, world_size
from ia3cli.errors import RecipeError
from ia3cli.models.loading import build_meta_model

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PretrainedConfig

    from ia3cli.config.recipe import Recipe

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_BYTES = {"4bit": 0.5 + 0.0625, "8bit": 1.0 + 0.0625}  # per weight of a quantised linear layer, with its scales


def sharded(recipe: Recipe) -> bool:
    """Whether this process shards its base: ``training.distributed: fsdp`` under a launcher (torchrun,
    ``accelerate launch``), over every process it started, be it one."""
    return recipe.training.distributed == "fsdp" and launched()


def sharded_after_wrap(recipe: Recipe) -> bool:
    """Whether the base is sharded after PEFT wraps it (:func:`shard_wrapped`) rather than while it loads: 4-bit."""
    return sharded(recipe) and recipe.model.quantization == "4bit"


def quant_storage(recipe: Recipe) -> str | None:
    """The dtype a sharded 4-bit base stores its packed values as: that of its other weights (``None``: not one)."""
    if not sharded_after_wrap(recipe):
        return None
    m = recipe.model
    return m.dtype if m.dtype != "auto" else m.bnb_4bit_compute_dtype


def shard_device() -> torch.device:
    """The device this rank computes on: its GPU (``LOCAL_RANK``), or the CPU without one."""
    import torch

    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def _blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's blocks (``_no_split_modules``), outermost first: the units FSDP shards one at a time."""
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ in kinds and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    return found


def shard_plan(meta_model: torch.nn.Module, sharding: str = "full_shard") -> dict[str, str]:
    """The FSDP plan ``DistributedConfig(fsdp_plan=...)`` takes: every block, by its name with ``*`` for the number.

    ``full_shard`` frees a block's gathered weights after its forward (``free_full_weight``); ``shard_grad_op``
    keeps them until its backward (``keep_full_weight``).
    """
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    style = "free_full_weight" if sharding == "full_shard" else "keep_full_weight"
    return {replace_layer_number_by_wildcard(name): style for name, _ in _blocks(meta_model)}


def distributed_config(recipe: Recipe, config: PretrainedConfig) -> Any:
    """The ``DistributedConfig`` that shards the base over every rank, or ``None`` when it loads whole.

    Raises:
        RecipeError: for ``training.fsdp_cpu_offload`` without a GPU (FSDP2 offloads from an accelerator).
    """
    if not sharded(recipe) or sharded_after_wrap(recipe):
        return None
    from transformers.distributed import DistributedConfig

    _check_offload(recipe)
    meta = build_meta_model(config, recipe.model.task, recipe.num_labels)
    return DistributedConfig(
        fsdp_size=world_size(),
        fsdp_plan=shard_plan(meta, recipe.training.fsdp_sharding),
        fsdp_cpu_offload=recipe.training.fsdp_cpu_offload,
    )


def _check_offload(recipe: Recipe) -> None:
    import torch

    if recipe.training.fsdp_cpu_offload and not torch.cuda.is_available():
        raise RecipeError(
            "training.fsdp_cpu_offload",
            "moves shards from a GPU to CPU memory, and there is no GPU here",
            "set it to false: on the CPU the shards are in CPU memory already",
        )


def shard_wrapped(model: PeftModel, recipe: Recipe) -> None:
    """Shard a 4-bit base that PEFT has wrapped: one FSDP2 group per block, plus the root for the rest.

    The trained parameters (IA3 vectors) stay whole, in float32; the Trainer then treats the model as one sharded at
    load time (broadcast of the vectors from rank 0, gradients averaged once per optimiser step).

    Raises:
        RecipeError: for ``training.fsdp_cpu_offload`` without a GPU.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    from transformers.distributed import DistributedConfig

    _check_offload(recipe)
    device = shard_device()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    trained = {p for p in model.parameters() if p.requires_grad}
    for p in trained:  # FSDP moves what it shards to the device, and leaves these where they are
        p.data = p.data.to(device)
    options: dict[str, Any] = {
        "mesh": init_device_mesh(device.type, (world_size(),)),
        "ignored_params": trained,
        "reshard_after_forward": recipe.training.fsdp_sharding == "full_shard",
    }
    if recipe.training.fsdp_cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    base = model.get_base_model()
    for _, block in _blocks(base):
        fully_shard(block, **options)
    fully_shard(base, **options)
    for module in base.modules():
        state = getattr(module, "quant_state", None)
        if state is not None and hasattr(state, "to"):
            state.to(device)  # in place: the block scales a 4-bit layer restores onto its gathered weight
    base.config.distributed_config = DistributedConfig(fsdp_size=world_size())
    base._is_distributed_loading_by_transformers = True


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs, from the config: weights, activations, and the trained vectors with AdamW state."""

    weights: float
    activations: float
    trainable: float
    world_size: int
    sharded: bool
    cpu_load: float = 0.0  # a sharded 4-bit base: CPU memory each rank holds while it loads (the whole base, packed)

    @property
    def total(self) -> float:
        return self.weights + self.activations + self.trainable

    def line(self) -> str:
        how = f"fsdp over {self.world_size} ranks" if self.sharded else f"a full copy on each of {self.world_size}"
        loading = f"; before sharding, ~{size(self.cpu_load)} of CPU memory per rank" if self.cpu_load else ""
        return (
            f"memory per rank ({how}): ~{size(self.total)} = weights {size(self.weights)} + activations "
            f"{size(self.activations)} + trained vectors {size(self.trainable)}{loading}"
        )


def size(n: float) -> str:
    """``12.3 GiB``, ``4.5 MiB``: bytes for a person."""
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _weight_bytes(meta_model: torch.nn.Module, dtype_bytes: int, quantization: str) -> tuple[float, float]:
    """All weights, and the largest block's, in bytes (linear layers inside blocks quantised as the recipe says)."""
    import torch

    per = QUANT_BYTES.get(quantization)
    blocks = _blocks(meta_model)
    block_bytes = []
    for _, block in blocks:
        total = 0.0
        for module in block.modules():
            for p in module.parameters(recurse=False):
                linear = isinstance(module, torch.nn.Linear) and p.dim() == 2
                total += p.numel() * (per if per is not None and linear else dtype_bytes)
        block_bytes.append(total)
    in_blocks = {id(p) for _, block in blocks for p in block.parameters()}
    rest = sum(p.numel() * dtype_bytes for p in meta_model.parameters() if id(p) not in in_blocks)
    return rest + sum(block_bytes), max(block_bytes, default=0.0)


def estimate(
    meta_model: torch.nn.Module,
    recipe: Recipe,
    *,
    world: int,
    fsdp: bool,
    trainable: int = 0,
) -> MemoryEstimate:
    """Memory per rank for training ``recipe`` on ``world`` ranks, under FSDP or DDP.

    Args:
        meta_model: The task model on the ``meta`` device (``loading.build_meta_model``).
        recipe: Gives the dtype, quantisation, ``max_length``, ``batch_size`` and gradient checkpointing.
        world: Number of ranks.
        fsdp: Shard the weights (``fsdp``), or keep a full copy on each rank (``ddp``).
        trainable: Trained parameters (IA3 vectors): float32 value, gradient and two AdamW moments each.
    """
    config = meta_model.config
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else str(getattr(config, "dtype", "float32"))
    dtype_bytes = DTYPE_BYTES.get(dtype.removeprefix("torch."), 4)
    weights, largest_block = _weight_bytes(meta_model, dtype_bytes, recipe.model.quantization)
    cpu_load = weights if fsdp and recipe.model.quantization == "4bit" else 0.0  # loaded whole, then sharded
    if fsdp and world > 1 and recipe.training.fsdp_sharding == "full_shard":
        # the shards, plus the block being computed and the next one, prefetched, gathered in full (shard_grad_op
        # keeps every block gathered from its forward to its backward: the whole base at the turn)
        weights = weights / world + 2 * largest_block
    t, s = recipe.training, recipe.data.max_length
    b = t.batch_size
    h = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", 1)
    layers = len(_blocks(meta_model))
    vocab = getattr(config, "vocab_size", 0)
    per_layer = s * b * h * (34 + 5 * heads * s / max(h, 1)) * dtype_bytes / 2
    # with gradient checkpointing each block keeps only its input, and one block's activations are rebuilt at a time
    kept = layers * s * b * h * dtype_bytes + per_layer if t.gradient_checkpointing else layers * per_layer
    activations = kept + 2 * s * b * vocab * 4  # float32 logits and their gradient
    return MemoryEstimate(weights, activations, trainable * 4 * 4, world, fsdp and world > 1, cpu_load)
