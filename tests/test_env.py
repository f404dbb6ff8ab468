"""Environment variables: read in ``ia3cli/env.py`` only, never written below ``cli.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ia3cli import env
from ia3cli.errors import Ia3Error

PACKAGE = Path(__file__).resolve().parents[1] / "ia3cli"

LAUNCHES = [
    # (RANK, WORLD_SIZE, rank, world size, main process, launched)
    (None, None, 0, 1, True, False),
    ("0", "1", 0, 1, True, True),  # torchrun --nproc_per_node 1
    ("0", "2", 0, 2, True, True),
    ("1", "2", 1, 2, False, True),
    ("", " ", 0, 1, True, False),
]


@pytest.mark.parametrize(("rank", "size", "want_rank", "want_size", "main", "launched"), LAUNCHES)
def test_rank_and_world_size(monkeypatch: pytest.MonkeyPatch, rank, size, want_rank, want_size, main, launched) -> None:
    for name, value in (("RANK", rank), ("WORLD_SIZE", size)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert (env.rank(), env.world_size(), env.is_main_process()) == (want_rank, want_size, main)
    assert env.launched() is launched


@pytest.mark.parametrize(("value", "on"), [(None, False), ("true", True), ("false", False), ("1", True)])
def test_accelerate_fsdp(monkeypatch: pytest.MonkeyPatch, value: str | None, on: bool) -> None:
    if value is None:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
    assert env.accelerate_fsdp() is on


def test_a_malformed_rank_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "first")
    with pytest.raises(Ia3Error, match="environment variable RANK='first' is not an integer"):
        env.rank()
    monkeypatch.setenv("LOCAL_RANK", "gpu0")
    with pytest.raises(Ia3Error, match="environment variable LOCAL_RANK='gpu0' is not an integer"):
        env.local_rank()


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IA3CLI_CACHE", str(tmp_path / "c"))
    assert env.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("IA3CLI_CACHE", "~/c")
    assert env.cache_dir() == Path.home() / "c"
    monkeypatch.delenv("IA3CLI_CACHE")
    assert env.cache_dir() == Path.home() / ".cache" / "ia3cli"


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("True", True), ("on", True), ("0", False), ("", False)])
def test_hub_offline(monkeypatch: pytest.MonkeyPatch, value: str, offline: bool) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert env.hub_offline() is offline


def _environment_uses(path: Path) -> list[tuple[int, str]]:
    """(line, 'read' or 'write') for each use of os.environ / os.getenv / os.putenv / os.unsetenv in a module."""
    uses = []
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"):
            continue
        if node.attr in ("putenv", "unsetenv"):
            uses.append((node.lineno, "write"))
        elif node.attr in ("environ", "getenv"):
            parent = parents.get(node)
            method = parent.attr if isinstance(parent, ast.Attribute) else None
            target = isinstance(parent, ast.Subscript) and isinstance(parent.ctx, (ast.Store, ast.Del))
            writes = method in ("setdefault", "update", "pop", "clear", "__setitem__") or target
            uses.append((node.lineno, "write" if writes else "read"))
    return uses


def test_only_env_reads_and_only_cli_writes_the_environment() -> None:
    found = {p.name: _environment_uses(p) for p in sorted(PACKAGE.glob("*.py"))}
    readers = {name for name, uses in found.items() if any(kind == "read" for _, kind in uses)}
    writers = {name for name, uses in found.items() if any(kind == "write" for _, kind in uses)}
    assert readers == {"env.py"}, found
    assert writers <= {"cli.py"}, found
