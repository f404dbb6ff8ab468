"""ia3cli's cache of derived files: float32 copies of GGUF bases (``$IA3CLI_CACHE/gguf``).

A GGUF base trained with 4/8-bit quantisation is dequantised once into a folder of safetensors that bitsandbytes can
quantise; the folder is reused as long as the GGUF file is unchanged. Each folder carries :data:`MARKER`, so
``ia3 cache clean`` removes only what ia3cli wrote. Writing one is announced on the ``ia3cli`` logger, which the
command line prints. No torch here.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ia3cli.env import cache_dir
from ia3cli.errors import Ia3Error
from ia3cli.outputs import human_bytes, read_json_object, write_atomic

MARKER = "ia3cli-cache.json"
log = logging.getLogger("ia3cli")


@dataclass
class CacheEntry:
    """One cached folder: its name, what it was made from, and its size on disk."""

    name: str
    path: Path
    source: str
    bytes: int


def gguf_root() -> Path:
    return cache_dir() / "gguf"


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def mark(folder: Path, source: Path) -> None:
    """Record, inside the folder being built, that ia3cli makes it from ``source``."""
    write_atomic(folder / MARKER, json.dumps({"source": str(source)}, indent=2) + "\n")


def announce(folder: Path, source: Path) -> None:
    """Say on the ``ia3cli`` logger that a cached folder was written, where, and how to remove it."""
    log.warning(
        "cached a float32 copy of %s in %s (%s); `ia3 cache list` shows the cache, `ia3 cache clean` empties it",
        source.name,
        folder,
        human_bytes(_size(folder)),
    )


def entries() -> list[CacheEntry]:
    """Every folder ia3cli cached, by name."""
    root = gguf_root()
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.is_dir() and (folder / MARKER).is_file():
            source = str(read_json_object(folder / MARKER).get("source", "?"))
            found.append(CacheEntry(folder.name, folder, source, _size(folder)))
    return found


def clean(names: list[str] | None = None) -> list[CacheEntry]:
    """Remove the named cached folders (default: all of them); only folders that carry :data:`MARKER`.

    Raises:
        Ia3Error: naming a folder that is not in the cache.
    """
    known = {e.name: e for e in entries()}
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise Ia3Error(f"not in the cache: {', '.join(unknown)}", "see `ia3 cache list` for the names")
    chosen = [known[n] for n in names] if names else list(known.values())
    for entry in chosen:
        shutil.rmtree(entry.path)
    return chosen
