"""Where inference runs: the one device policy of ``eval``, ``predict``, ``serve``, ``compare`` and ``merge``.

- ``--device auto`` (the default) takes the accelerator when there is one: ``cuda`` (GPU 0), else Apple's ``mps``,
  else the CPU. ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` name one; a device this machine does not have is an error
  (exit 2) that names it and the devices there are.
- The base is loaded straight onto that device (``device_map={"": device}``: no full copy in CPU memory first).
  With ``model.device_map`` in the recipe (``auto``, ``balanced``, ``sequential`` or a map of module name ->
  device) and ``--device auto``, the map decides: the base is spread over the GPUs as accelerate's big-model
  inference does. A device named explicitly (``--device cuda:1``, ``--device cpu``) takes the whole base instead.
- Inputs go to the device of the model's input embeddings (:func:`input_device`): on a spread model that is where
  the first layer sits, and accelerate's hooks move activations between GPUs from there.

Training does not place anything here (the Trainer, or torchrun, moves the model and its batches); it takes its
mixed precision from :func:`precision_flags` (``training.precision``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ia3cli.errors import Ia3Error, RecipeError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_HELP = "Where the model runs: auto (the GPU when there is one), cpu, cuda, cuda:N or mps."
_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_name(name: str) -> str:
    """``name`` normalised (stripped, lower-case) when it is a device name ia3cli knows; no torch needed.

    Raises:
        Ia3Error: naming the value and the accepted names.
    """
    text = str(name).strip().lower()
    if not _PATTERN.match(text):
        raise Ia3Error(f"--device: '{name}' is not a device", f"use {DEVICE_CHOICES}")
    return text


def available() -> list[str]:
    """The devices this machine has, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def resolve(name: str = "auto") -> torch.device:
    """The ``torch.device`` that ``--device NAME`` stands for on this machine.

    Raises:
        Ia3Error: for an unknown name, or a device that is not there (naming the devices that are).
    """
    import torch

    text = check_name(name)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise Ia3Error("--device: 'mps' is not available on this machine", _present_hint())
        return torch.device("mps")
    return _check_gpu(text, "--device")


def _check_gpu(text: str, what: str) -> torch.device:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(text.split(":")[1]) if ":" in text else 0
    if index >= count:
        have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
        raise Ia3Error(f"{what}: '{text}' is not available: this machine has {have}", _present_hint())
    return torch.device("cuda", index)


def torch_dtype(name: str) -> torch.dtype | str:
    """Map a recipe dtype name to a ``torch.dtype`` (``auto`` passes through)."""
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_kwargs(device: str | None, device_map: Any = None) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that put a base where ``--device DEVICE`` says.

    Args:
        device: A ``--device`` value; ``None`` loads as training wants it (no map: the Trainer places the model).
        device_map: ``model.device_map``: with ``auto`` it is passed on as is; an explicit device overrides it.

    Raises:
        Ia3Error: for a device that is not there.
    """
    if device is None:
        return {}
    if check_name(device) == "auto" and device_map is not None:
        for module, where in device_map.items() if isinstance(device_map, dict) else []:
            if not isinstance(where, str) or where.startswith("cuda"):
                _check_gpu(f"cuda:{where}" if isinstance(where, int) else where, f"model.device_map: '{module}'")
        return {"device_map": device_map}
    where = resolve(device)
    return {} if where.type == "cpu" else {"device_map": {"": str(where)}}


def precision_flags(precision: str) -> dict[str, bool]:
    """``TrainingArguments`` ``bf16``/``fp16`` for ``training.precision`` on this machine.

    ``auto`` is bf16 on a CUDA GPU that supports it (Ampere and newer), else fp32: on a CPU, bf16 autocast is
    slower than fp32 on most chips. The IA3 vectors themselves stay float32 (the optimiser updates full-precision
    values; autocast only lowers the matmuls).

    Raises:
        RecipeError: on ``training.precision`` for fp16 without a CUDA GPU, or bf16 on a GPU without bf16.
    """
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if precision == "auto":
        precision = "bf16" if bf16_ok else "fp32"
    if precision == "fp16" and not cuda:
        raise RecipeError("training.precision", "fp16 mixed precision needs a CUDA GPU", "use bf16 or fp32 here")
    if precision == "bf16" and cuda and not bf16_ok:
        name = torch.cuda.get_device_name()
        raise RecipeError("training.precision", f"{name} has no bfloat16 support", "use fp16 (or fp32)")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (its first parameter's if it has none)."""
    import torch

    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if get is not None else None
    except (AttributeError, NotImplementedError):
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_inputs(batch: dict[str, Any], model: Any) -> dict[str, Any]:
    """``batch`` with every tensor on :func:`input_device` of ``model`` (other values unchanged)."""
    import torch

    device = input_device(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _present_hint() -> str:
    return f"devices here: {', '.join(available())}; --device auto picks the best of them"
