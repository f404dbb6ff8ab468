"""Training under several processes: DDP (the Trainer's own) or FSDP (a base sharded at load time).

With ``training.distributed: ddp`` every rank holds the whole base and Accelerate wraps the model in DDP. With
``fsdp`` the base is sharded while it loads (:mod:`ia3cli.models.sharding`) and the Trainer recognises such a model
(``is_distributed_loading_by_transformers``): it skips DDP, broadcasts the replicated IA3 vectors from rank 0 and
averages their gradients once per optimiser step. The health monitor measures its per-group norms in a callback at the
end of each backward pass, after those averaging hooks ran, so it sees the full, averaged gradients.

Checkpoints: transformers refuses to checkpoint the optimiser of a model sharded at load time, because in general its
state would be sharded too. Here the optimiser only holds the IA3 vectors (or LoRA matrices), which are plain
tensors, identical on every rank, so rank 0's ``optimizer.pt`` is the whole state, exactly as under DDP, and
``--resume`` restores it on every rank. :func:`trainer_arguments` and :func:`allow_checkpoints` get past that check;
:func:`check_trainable_replicated` makes sure the premise holds before training starts.

Pre-flight (:func:`memory_lines`): memory per rank from the config, with a warning when DDP would not fit the device
but FSDP would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ia3cli.env import accelerate_fsdp, world_size
from ia3cli.errors import RecipeError, RunError
from ia3cli.models import sharding

if TYPE_CHECKING:
    from ia3cli.config.recipe import Recipe


def check_launcher(recipe: Recipe) -> None:
    """Refuse Accelerate's own FSDP wrapping (``accelerate launch --use_fsdp``): ia3cli shards the base itself.

    Accelerate would wrap the PEFT model in FSDP1 with its auto-wrap policy, which is where IA3 meets peft#1702
    (mixed ``requires_grad`` in one flat parameter).

    Raises:
        RecipeError: under ``accelerate launch --use_fsdp``.
    """
    if accelerate_fsdp():
        raise RecipeError(
            "training.distributed",
            f"is '{recipe.training.distributed}' and this process was started by accelerate launch --use_fsdp, "
            "whose FSDP wrapping ia3cli does not use (it shards the base itself)",
            "launch with `accelerate launch --multi_gpu --num_processes N` (no --use_fsdp, no FSDP in the accelerate "
            "config) and set training.distributed: fsdp to shard the base",
        )


def trainer_arguments(recipe: Recipe) -> dict[str, Any]:
    """Extra ``TrainingArguments`` for a sharded base: ``save_only_model`` until the Trainer is built (see above)."""
    return {"save_only_model": True} if sharding.sharded(recipe) else {}


def allow_checkpoints(trainer: Any, recipe: Recipe) -> None:
    """Let the Trainer save (and resume) optimizer, scheduler and RNG state after its constructor's check."""
    if sharding.sharded(recipe):
        check_trainable_replicated(trainer.model)
        trainer.args.save_only_model = False


def check_trainable_replicated(model: Any) -> None:
    """Every trainable parameter is a plain tensor (never an FSDP shard), so rank 0's optimiser state is the whole.

    Raises:
        RunError: when a trained parameter was sharded (a head that PEFT copied from a sharded module).
    """
    from torch.distributed.tensor import DTensor

    sharded = [name for name, p in model.named_parameters() if p.requires_grad and isinstance(p, DTensor)]
    if sharded:
        raise RunError(
            f"training.distributed: fsdp sharded trained parameters ({', '.join(sharded[:3])}), whose optimiser "
            "state ia3cli cannot checkpoint",
            "use training.distributed: ddp for this model and task",
        )


def memory_lines(recipe: Recipe, trainable: int) -> tuple[str, list[str]]:
    """The estimated memory per rank, and warnings: DDP that would not fit the device while FSDP would.

    Args:
        recipe: The recipe (model config, dtype, batch, ``max_length``, ``training.distributed``).
        trainable: Trained parameters (the plan's IA3 vector entries).

    Returns:
        One line for the console, and the warnings (none without a CUDA device to compare with).
    """
    from ia3cli.models.loading import build_meta_model, load_config

    meta = build_meta_model(load_config(recipe.model), recipe.model.task, recipe.num_labels)
    world = world_size()
    fsdp = recipe.training.distributed == "fsdp"
    mine = sharding.estimate(meta, recipe, world=world, fsdp=fsdp, trainable=trainable)
    device = _device_bytes()
    if device is None or mine.total <= device:
        return mine.line(), []
    have = f"the device has {sharding.size(device)}"
    if not fsdp and world > 1:
        other = sharding.estimate(meta, recipe, world=world, fsdp=True, trainable=trainable)
        if other.total <= device:
            return mine.line(), [
                f"training.distributed: ddp puts the whole base on each rank: ~{sharding.size(mine.total)}, "
                f"{have}; fsdp over {world} ranks needs ~{sharding.size(other.total)}: set "
                "training.distributed: fsdp"
            ]
    return mine.line(), [
        f"~{sharding.size(mine.total)} per rank will not fit ({have}): use more ranks with "
        "training.distributed: fsdp, training.gradient_checkpointing: true, a smaller batch_size or max_length"
    ]


def _device_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def leave_process_group() -> None:
    """Every rank leaves the process group together at the end of a run.

    A rank that exits while gloo's threads still hold the group aborts ("terminate called without an active
    exception"). This happens when one rank finishes long before another, for example on a resume that has no step
    left to train.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
