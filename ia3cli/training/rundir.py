"""The run directory: claiming it (never clobbering another run), what it records first, and its checkpoints.

A run dir is self-describing: ``recipe.yaml`` (resolved) and ``run.json`` (versions, world size, the target plan)
are written before training starts, so ``ia3 eval``, ``ia3 merge`` and ``--resume`` need nothing else.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ia3cli import __version__
from ia3cli.config.load import dump_recipe
from ia3cli.config.recipe import Recipe
from ia3cli.env import launched, world_size
from ia3cli.errors import Ia3Error, RunError
from ia3cli.outputs import RUN_MARKER, remove_output


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint: it has ``trainer_state.json`` and a loadable adapter file.

    The Trainer (transformers 5.23, ``_save_checkpoint``) writes ``trainer_state.json`` after the adapter, optimizer,
    scheduler and RNG state, so a checkpoint killed mid-write lacks it. Under several processes the other ranks'
    ``rng_state_<rank>.pth`` are written alongside and not checked: if one is missing the Trainer warns and goes on.
    """
    from safetensors import safe_open

    candidates = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for ckpt in candidates:
        adapter = ckpt / "adapter_model.safetensors"
        if not adapter.is_file():  # adapter.method full/head checkpoint a whole model
            adapter = ckpt / "model.safetensors"
        if not (ckpt / "trainer_state.json").is_file() or not adapter.is_file():
            continue
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            with safe_open(str(adapter), "pt") as fh:
                list(fh.keys())
        except Exception:
            continue
        return ckpt
    return None


def claim_output_dir(recipe: Recipe, out: Path, *, resume: bool, overwrite: bool) -> None:
    """Create the run directory, or refuse to clobber another run.

    Raises:
        Ia3Error: when ``out`` holds files of a different recipe (or any run, without ``--resume``).
        RunError: when the directory cannot be created.
    """
    if out.exists() and not out.is_dir():
        raise Ia3Error(f"training.output_dir: {out} is a file", "choose another output_dir")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            keep = protected_folders(recipe)
            remove_output(out, RUN_MARKER, key="training.output_dir", flag="--overwrite", keep=keep)
        elif resume:
            if not (out / RUN_MARKER).is_file():
                raise Ia3Error(
                    f"--resume: {out} is not an ia3cli run dir (no {RUN_MARKER})",
                    "point training.output_dir at the run to resume",
                )
            for stale in out.glob(".staging-*"):  # a final save killed before its renames: never published
                shutil.rmtree(stale, ignore_errors=True)
            saved = out / "recipe.yaml"
            if saved.is_file() and saved.read_text(encoding="utf-8") != dump_recipe(recipe):
                raise Ia3Error(
                    f"training.output_dir: {out} was started from a different recipe",
                    "resume with the same recipe and --set values, or pass --overwrite to start over",
                )
        else:
            raise Ia3Error(
                f"training.output_dir: {out} is not empty",
                "pass --resume to continue that run, --overwrite to start over, or set another output_dir",
            )
    elif resume:
        raise Ia3Error(f"--resume: no run to resume in {out}", "drop --resume to start a new run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"training.output_dir: cannot create {out}: {exc.strerror}") from None


def protected_folders(recipe: Recipe) -> tuple[Path, ...]:
    """Folders a run must never replace, besides the root, home and working directory: the recipe's and the data's."""
    folders = [recipe.source.parent] if recipe.source is not None else []
    data = Path(recipe.data.path)
    if data.exists():
        folders.append(data if data.is_dir() else data.parent)
    return tuple(folders)


def run_info(recipe: Recipe, plan: Any) -> dict[str, Any]:
    """Versions and launch facts stored as ``run.json``: what ``eval`` and ``merge`` need to know about a run."""
    import peft
    import torch
    import transformers

    from ia3cli.models.device import precision_flags

    flags = precision_flags(recipe.training.precision)
    return {
        "ia3cli": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "task": recipe.model.task,
        "base_model": recipe.model.name,
        "quantization": recipe.model.quantization,
        "precision": "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32",  # training.precision resolved
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "world_size": world_size(),
        "distributed": recipe.training.distributed if launched() else None,
        "status": "running",  # then "finished", or "preempted" (a checkpoint to --resume from)
        "model_type": plan.model_type,
        "groups": plan.groups,  # module -> IA3 group, as the health monitor and `ia3 report` group the vectors
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
