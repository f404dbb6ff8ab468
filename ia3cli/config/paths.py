"""The two path rules of ia3cli: a name is a local path or a hub id, and where a relative path is found.

- :func:`looks_local`: ``model.name``, ``data.path`` and ``ia3 eval TARGET`` are hub ids unless they look like a
  path (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``, a trailing slash or a backslash) or exist on disk. A hub id
  has at most one ``/`` (``org/name``).
- :func:`resolve_inputs`: a relative path a recipe *reads* (``model.name``, ``data.path``, ``adapter.init_from``)
  is taken from the working directory when it exists there, else from the recipe's folder when it exists there,
  so a recipe can name files shipped beside it. A path a recipe *writes* (``training.output_dir``) is always
  relative to the working directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from ia3cli.errors import RecipeError

#: (section, key) of every recipe key that names something to read.
INPUT_PATHS = (("model", "name"), ("data", "path"), ("adapter", "init_from"))


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (see the module docstring)."""
    if Path(name).expanduser().exists():
        return True
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or name.count("/") > 1
        or name.endswith("/")
        or "\\" in name
        or (os.sep != "/" and os.sep in name)
    )


def resolve_inputs(raw: dict[str, Any], recipe_dir: Path) -> None:
    """Point relative input paths of a raw recipe mapping at the recipe's folder where only that folder has them."""
    for section, key in INPUT_PATHS:
        block = raw.get(section)
        value = block.get(key) if isinstance(block, dict) else None
        if not isinstance(value, str) or value.startswith("pkg:") or Path(value).expanduser().is_absolute():
            continue
        beside = recipe_dir / value
        if not Path(value).exists() and beside.exists():
            block[key] = str(beside.resolve())


PKG_PREFIX = "pkg:"


def resolve_model_path(name: str) -> str:
    """Turn ``pkg:PACKAGE[/SUBDIR]`` into the directory inside the installed package; other names pass through.

    Raises:
        RecipeError: when the package is not installed or the folder does not exist.
    """
    if not name.startswith(PKG_PREFIX):
        return name
    package, _, sub = name[len(PKG_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise RecipeError("model.name", f"package '{package}' is not installed", f"pip install {dist}")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise RecipeError("model.name", f"'{sub}' is not a folder inside package '{package}' ({folder})")
    return str(folder)
