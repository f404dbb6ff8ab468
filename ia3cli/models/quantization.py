"""4-bit and 8-bit bases (bitsandbytes): the quantisation config a recipe asks for, and the weights kept unquantised.

Heads (``HEAD_MODULES``) are never quantised: they are trained in full. ``quant_storage`` is for FSDP (see
:mod:`ia3cli.models.sharding`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ia3cli.config.families import HEAD_MODULES
from ia3cli.errors import Ia3Error
from ia3cli.models.device import torch_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ia3cli.config.recipe import ModelSection


def quantization_config(model: ModelSection, quant_storage: str | None = None) -> Any:
    """The ``BitsAndBytesConfig`` for ``model.quantization``, or ``None`` for full precision.

    ``quant_storage`` (4-bit only) is the dtype the packed 4-bit values are stored as: FSDP shards and gathers them
    like any other weight of that dtype (bitsandbytes' default is uint8).

    Raises:
        Ia3Error: when bitsandbytes is needed but missing.
    """
    if model.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Ia3Error(
            f"model.quantization={model.quantization} needs bitsandbytes", "pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    if model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEAD_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=HEAD_MODULES,
        bnb_4bit_quant_type=model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(model.bnb_4bit_compute_dtype),
        **({"bnb_4bit_quant_storage": torch_dtype(quant_storage)} if quant_storage else {}),
    )


def unquantised_in_float32(base: PreTrainedModel) -> None:
    """A 4/8-bit base keeps its other weights (norms, embeddings, head) in float32, wherever it is loaded.

    Training does this anyway (PEFT's ``prepare_model_for_kbit_training``), so evaluation, prediction and serving
    then run the model that was trained. It is also needed: PEFT's IA3 layers on bitsandbytes weights (0.21) return
    float32 for half-precision input when autocast is off, and would meet half-precision queries in attention.
    """
    import torch

    for p in base.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
            p.data = p.data.float()
