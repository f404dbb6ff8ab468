"""The environment variables ia3cli reads, in one place; no module below ``cli.py`` writes any.

- ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``: set by torchrun and ``accelerate launch`` for each process (absent:
  one process).
- ``ACCELERATE_USE_FSDP``: set by ``accelerate launch --use_fsdp`` (Accelerate's own FSDP wrapping).
- ``IA3CLI_CACHE``: where derived files go (dequantised GGUF checkpoints); default ``~/.cache/ia3cli``.
- ``HF_HUB_OFFLINE``: the Hugging Face Hub's offline switch, read to explain why a hub id cannot be loaded.

Nothing in this module imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from ia3cli.errors import Ia3Error

TRUE_VALUES = ("1", "true", "yes", "on")


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise Ia3Error(
            f"environment variable {name}={value!r} is not an integer", f"unset {name} or let the launcher set it"
        ) from None


def rank() -> int:
    """This process's rank among the launcher's processes (``RANK``; 0 without a launcher).

    Raises:
        Ia3Error: when ``RANK`` is not an integer.
    """
    return _int("RANK", 0)


def world_size() -> int:
    """Number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher).

    Raises:
        Ia3Error: when ``WORLD_SIZE`` is not an integer.
    """
    return _int("WORLD_SIZE", 1)


def launched() -> bool:
    """Whether a launcher (torchrun, ``accelerate launch``) started this process, even as its only one."""
    return os.environ.get("WORLD_SIZE", "").strip() != ""


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 without a launcher): the GPU it uses.

    Raises:
        Ia3Error: when ``LOCAL_RANK`` is not an integer.
    """
    return _int("LOCAL_RANK", 0)


def accelerate_fsdp() -> bool:
    """Whether ``accelerate launch --use_fsdp`` (or an Accelerate config with FSDP) started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in TRUE_VALUES


def is_main_process() -> bool:
    """True on the process that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def cache_dir() -> Path:
    """Where ia3cli caches derived files (``$IA3CLI_CACHE``, default ``~/.cache/ia3cli``)."""
    value = os.environ.get("IA3CLI_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "ia3cli"


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off (``HF_HUB_OFFLINE`` set to 1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES


def dumb_terminal() -> bool:
    """``TERM=dumb``: the terminal cannot redraw a line in place."""
    return os.environ.get("TERM") == "dumb"
