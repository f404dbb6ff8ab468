"""Adapter names -> run dirs inside one adapter directory, and the LRU of adapters loaded in the model.

Nothing a request sends can load files outside the adapter directory: adapter names are plain folder names
(no separators, no ``..``), paths are resolved (symlinks included) and must stay inside it. Adapters load into the
:class:`~ia3cli.tuners.mixed.MixedIA3` on first use; beyond ``max_adapters`` the least recently used one not needed by
the batch at hand is evicted (it reloads on its next use). Loads and evictions run on the model thread only.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia3cli.errors import Ia3Error

if TYPE_CHECKING:
    from ia3cli.serving.prometheus import Metrics
    from ia3cli.tuners.mixed import MixedIA3

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterNotFound(Ia3Error):
    """No adapter of that name in the adapter directory (HTTP 404)."""


class PathOutside(Ia3Error):
    """A requested path resolves outside the adapter directory (HTTP 403)."""


class BadInput(Ia3Error):
    """A request the adapter cannot take: not a classifier, or a row missing a prompt-template field (HTTP 422)."""


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a PEFT adapter and the recipe it was trained with."""
    return (path / "adapter_config.json").is_file() and (path / "recipe.yaml").is_file()


def run_dir_named(root: Path, name: str) -> Path | None:
    """The run dir folder ``name`` of the adapter directory ``root`` (resolved, inside it), else ``None``."""
    if not NAME_RE.match(name) or ".." in name:
        return None
    try:
        path = (root / name).resolve()
    except (OSError, ValueError, RuntimeError):
        return None
    return path if path.is_relative_to(root.resolve()) and is_run_dir(path) else None


def first_run(path: Path) -> Path:
    """The run dir whose base ``ia3 serve PATH`` loads: PATH itself, or its first run dir by name.

    Raises:
        Ia3Error: when PATH is missing or holds no run dir.
    """
    path = Path(path)
    if not path.is_dir():
        raise Ia3Error(f"{path}: adapter directory not found", "pass a run dir or a folder of run dirs")
    if is_run_dir(path):
        return path
    runs = sorted(p for p in path.iterdir() if is_run_dir(p) and p.resolve().is_relative_to(path.resolve()))
    if not runs:
        raise Ia3Error(
            f"{path}: no run dirs (folders with adapter_config.json and recipe.yaml)",
            "train one with `ia3 train RECIPE` and put its output_dir there",
        )
    return runs[0]


class AdapterPool:
    """Adapter names -> run dirs inside ``root``; at most ``max_adapters`` loaded, least recently used evicted.

    Args:
        mixed: The model holding the loaded adapters.
        root: The adapter directory; every adapter path must resolve inside it.
        max_adapters: LRU bound on loaded adapters.
        metrics: Where loads and evictions are counted.
        loaded: Adapters ``mixed`` already holds, with their run dirs.
    """

    def __init__(
        self, mixed: MixedIA3, root: Path, max_adapters: int, metrics: Metrics, loaded: dict[str, Path]
    ) -> None:
        self.mixed = mixed
        self.root = Path(root).resolve()
        self.max_adapters = max_adapters
        self.metrics = metrics
        self.registered: dict[str, Path] = {}  # added by POST /adapters
        self.lru: collections.OrderedDict[str, Path] = collections.OrderedDict(loaded)
        self.metrics.set("ia3_adapters_loaded", len(self.lru))

    def inside(self, path: str | Path) -> Path:
        """``path`` (relative to the adapter directory, or absolute) resolved; it must stay inside that directory.

        Raises:
            PathOutside: when it resolves (through ``..`` or symlinks) outside the adapter directory.
        """
        try:
            resolved = (self.root / Path(path)).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop
            raise PathOutside(f"path '{path}' cannot be resolved: {exc}") from None
        if not resolved.is_relative_to(self.root):
            raise PathOutside(f"path '{path}' is outside the adapter directory", "give a path inside the adapter dir")
        return resolved

    def find(self, name: str) -> Path:
        """The run dir of adapter ``name``: a registered one, else the folder of that name in the adapter directory.

        Raises:
            AdapterNotFound: for a name that is not a plain folder name or has no run dir.
        """
        if name in self.registered:
            return self.registered[name]
        if name in self.lru:
            return self.lru[name]
        path = run_dir_named(self.root, name)
        if path is not None:
            return path
        raise AdapterNotFound(f"adapter '{name}' not found", "GET /v1/models lists the adapters")

    def known(self) -> list[str]:
        """Every adapter name a request may use: registered, loaded, and run dirs in the adapter directory."""
        names = set(self.registered) | set(self.lru)
        if is_run_dir(self.root):
            names.add(self.root.name)
        else:
            for entry in self.root.iterdir():
                if NAME_RE.match(entry.name) and is_run_dir(entry) and entry.resolve().is_relative_to(self.root):
                    names.add(entry.name)
        return sorted(names)

    # --- below: model thread only ----------------------------------------------------------------------------------

    def ensure(self, names: set[str]) -> dict[str, Ia3Error]:
        """Load every adapter in ``names`` not loaded yet, evicting the least recently used ones not in ``names``.

        Returns:
            The adapters that could not be loaded, with the reason.
        """
        failed: dict[str, Ia3Error] = {}
        for name in names:
            if name in self.lru:
                self.lru.move_to_end(name)
                continue
            while len(self.lru) >= self.max_adapters:
                victim = next((n for n in self.lru if n not in names), None)
                if victim is None:
                    break
                self._drop(victim)
                self.metrics.inc("ia3_adapter_evictions_total")
            try:
                path = self.find(name)
                self.mixed.add(name, path)
            except Ia3Error as exc:
                failed[name] = exc
                continue
            self.lru[name] = path
            self.metrics.inc("ia3_adapter_loads_total")
        self.metrics.set("ia3_adapters_loaded", len(self.lru))
        return failed

    def register(self, name: str, path: str) -> dict[str, Any]:
        """Register (and load) adapter ``name`` from ``path`` inside the adapter directory.

        Raises:
            PathOutside: for a path outside the adapter directory.
            AdapterNotFound: when the path holds no run dir.
            Ia3Error: when the adapter does not fit the base (from :meth:`MixedIA3.add`).
        """
        if not NAME_RE.match(name):
            raise Ia3Error(f"adapter name '{name}' is not allowed", "use letters, digits, '.', '_' and '-'")
        resolved = self.inside(path)
        if not is_run_dir(resolved):
            raise AdapterNotFound(f"no run dir at '{path}' (adapter_config.json and recipe.yaml)")
        if name in self.lru:
            self._drop(name)
        self.registered[name] = resolved
        failed = self.ensure({name})
        if name in failed:
            del self.registered[name]
            raise failed[name]
        return {"name": name, "path": str(resolved.relative_to(self.root)), "bytes": self.mixed.nbytes(name)}

    def unregister(self, name: str) -> None:
        """Unload adapter ``name`` and forget a registration (a run dir of that name can still hot-load).

        Raises:
            AdapterNotFound: when it is neither loaded nor registered.
        """
        if name not in self.lru and name not in self.registered:
            raise AdapterNotFound(f"adapter '{name}' is not loaded")
        self.registered.pop(name, None)
        if name in self.lru:
            self._drop(name)
        self.metrics.set("ia3_adapters_loaded", len(self.lru))

    def unload(self, name: str) -> bool:
        """Unload adapter ``name`` if it is loaded (an eviction decided outside the pool); whether it was.

        A registration stays, and a run dir of that name hot-loads again on its next use.
        """
        if name not in self.lru:
            return False
        self._drop(name)
        self.metrics.inc("ia3_adapter_evictions_total")
        self.metrics.set("ia3_adapters_loaded", len(self.lru))
        return True

    def _drop(self, name: str) -> None:
        self.mixed.remove(name)
        del self.lru[name]
