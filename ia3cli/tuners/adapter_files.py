"""A finished run dir as an adapter for :class:`ia3cli.tuners.mixed.MixedIA3`: its recipe, adapter config and
tensors, read with errors that name the adapter; what identifies its base; its IA3 vectors by module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ia3cli.errors import Ia3Error

if TYPE_CHECKING:
    from ia3cli.config.recipe import Recipe

PREFIX = "base_model.model."
VECTOR_SUFFIX = ".ia3_l"
RUN_HINT = "pass the output_dir of a finished `ia3 train` (adapter_config.json, adapter_model.safetensors, recipe.yaml)"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_adapter(name: str, run_dir: Path) -> tuple[Recipe, dict[str, Any], dict[str, torch.Tensor]]:
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
            f"adapter '{name}': {run_dir / 'adapter_config.json'} is unreadable: {first_line(exc)}"
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
        raise Ia3Error(f"adapter '{name}': {weights} is corrupt: {first_line(exc)}", RUN_HINT) from None
    return recipe, config, tensors


def base_identity(recipe: Recipe) -> tuple[str, str | None, str | None]:
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


def vectors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The IA3 vectors of an adapter's tensors, by the base module they scale."""
    return {
        k.removeprefix(PREFIX).removesuffix(VECTOR_SUFFIX): v for k, v in tensors.items() if k.endswith(VECTOR_SUFFIX)
    }


def is_feedforward(vector: torch.Tensor) -> bool:
    # PEFT shapes an IA3 vector (1, in_features) for feed-forward modules and (out_features, 1) otherwise
    return vector.dim() == 2 and vector.shape[0] == 1 and vector.shape[1] != 1
