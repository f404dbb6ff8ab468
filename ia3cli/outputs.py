"""Files ia3cli writes, and the only directories it may ever replace.

Every file is written through a temporary sibling and ``os.replace`` (:func:`write_atomic`), and whole outputs are
staged then renamed into place (:func:`publish_dir`), so a kill never leaves a truncated file.

ia3cli replaces or deletes a directory only when it wrote it itself: each kind of output carries a marker file (a
run dir ``run.json``, a merged model ``merge_report.json``, a compare dir ``compare.json``).
:func:`check_replaceable` refuses everything else, whatever flag the user passed: a folder without the marker,
and, marker or not, the filesystem root, the home folder, the working directory and the folders above them, git
repositories, and the folders a recipe and its data live in. Nothing in this module imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ia3cli.errors import Ia3Error

RUN_MARKER = "run.json"
MERGE_MARKER = "merge_report.json"
COMPARE_MARKER = "compare.json"


def file_mode() -> int:
    """The mode a new file gets under the current umask (``mkstemp`` creates 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a file (text as UTF-8, or bytes) through a temporary sibling, ``fsync`` and ``os.replace``: old or new,
    never half. The only way ia3cli writes a file of its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file's content, or ``{}`` when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def publish_dir(staging: Path, dest: Path) -> None:
    """Move every entry of ``staging`` into ``dest`` one atomic rename at a time, then remove ``staging``."""
    for src in sorted(staging.iterdir()):
        if src.is_file():
            os.chmod(src, file_mode())
        os.replace(src, dest / src.name)
    staging.rmdir()


def _protected(path: Path, extra: tuple[Path, ...]) -> str | None:
    """Why ``path`` must never be replaced whatever it holds, or ``None``."""
    resolved = path.resolve()
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the filesystem root"
    if resolved == home or home.is_relative_to(resolved):
        return "it is your home folder or contains it"
    if resolved == cwd or cwd.is_relative_to(resolved):
        return "it is the working directory or contains it"
    for folder in extra:
        folder = folder.resolve()
        if resolved == folder or folder.is_relative_to(resolved):
            return f"it holds {folder} (the recipe's folder)"
    if (resolved / ".git").exists():
        return "it is a git repository"
    return None


def check_replaceable(path: Path, marker: str, *, key: str, flag: str, keep: tuple[Path, ...] = ()) -> None:
    """Refuse to replace ``path`` unless ia3cli wrote it: it is missing, empty, or holds ``marker``.

    Args:
        path: The directory about to be replaced.
        marker: The file ia3cli writes into every output of this kind (``run.json``, ``merge_report.json``).
        key: What names the path for the user (``training.output_dir``, ``OUT``).
        flag: The flag that asked for the replacement (``--overwrite``, ``--force``), named in the message.
        keep: Folders that must survive whatever ``path`` is (the recipe's folder).

    Raises:
        Ia3Error: naming the path and why it is refused; nothing has been touched.
    """
    path = Path(path).expanduser()
    if not path.exists():
        return
    if not path.is_dir():
        raise Ia3Error(f"{key}: {path} is a file, not a directory ia3cli wrote", f"choose another {key}")
    why = _protected(path, keep)
    if why:
        raise Ia3Error(
            f"{key}: refusing to replace {path} ({why}), even with {flag}", f"point {key} at a folder of its own"
        )
    if any(path.iterdir()) and not (path / marker).is_file():
        shown = ", ".join(sorted(p.name for p in path.iterdir())[:5])
        raise Ia3Error(
            f"{key}: {path} holds files ia3cli did not write ({shown}); {flag} only replaces an ia3cli output "
            f"(one with {marker})",
            f"move those files away or choose another {key}; nothing was deleted",
        )


def remove_output(path: Path, marker: str, *, key: str, flag: str, keep: tuple[Path, ...] = ()) -> None:
    """Delete a directory ia3cli wrote (checked by :func:`check_replaceable` first, so nothing else ever goes)."""
    check_replaceable(path, marker, key=key, flag=flag, keep=keep)
    path = Path(path).expanduser()
    if path.is_dir():
        shutil.rmtree(path)


def human_bytes(n: int | None) -> str:
    """``12.3 KB``-style size (decimal units)."""
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
