"""Generate the README's recipe reference and CLI reference from the schema and the commands themselves.

``python -m ia3cli.cli.docs README.md`` rewrites the generated blocks; ``--check`` exits 1 when they are stale (a test
runs the check, so the README cannot drift from the code).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

from ia3cli.config.recipe import SECTIONS

MARKERS = {
    "recipe-reference": lambda: recipe_reference(),
    "cli-reference": lambda: cli_reference(),
}


def _default(field: object) -> str:
    default = getattr(field, "default", PydanticUndefined)
    if default is PydanticUndefined:
        factory = getattr(field, "default_factory", None)
        return "`[]`" if factory is list else "*required*"
    if default is None:
        return "`null`"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    return f"`{default}`"


def recipe_reference() -> str:
    """Markdown tables of every recipe key: section, key, default and help."""
    out: list[str] = []
    for name, section in SECTIONS.items():
        out.append(f"#### `{name}` — {section.__doc__.strip().splitlines()[0]}\n")
        out.append("| key | default | meaning |")
        out.append("|---|---|---|")
        for key, field in section.model_fields.items():
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{key}` | {_default(field)} | {desc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def cli_reference() -> str:
    """The ``--help`` text of ``ia3`` and each command."""
    import typer
    from typer.testing import CliRunner

    from ia3cli.cli.app import app

    runner = CliRunner()
    blocks: list[str] = []
    commands = list(typer.main.get_command(app).commands)  # type: ignore[attr-defined]  # in definition order
    for args in ([], *([name] for name in commands)):
        text = runner.invoke(app, [*args, "--help"], prog_name="ia3", terminal_width=100).output
        title = " ".join(["ia3", *args])
        blocks.append(f"#### `{title}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(blocks)


def render(readme: str) -> str:
    """Replace every generated block in ``readme`` with fresh content."""
    for marker, make in MARKERS.items():
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        if start not in readme:
            continue
        head, rest = readme.split(start, 1)
        _, tail = rest.split(end, 1)
        readme = f"{head}{start}\n{make()}{end}{tail}"
    return readme


def main(argv: list[str]) -> int:
    """Rewrite (or with ``--check``, verify) the generated blocks of a README."""
    check = "--check" in argv
    paths = [a for a in argv if not a.startswith("--")] or ["README.md"]
    path = Path(paths[0])
    current = path.read_text(encoding="utf-8")
    fresh = render(current)
    if check:
        if fresh != current:
            print(f"{path}: generated reference is stale; run `python -m ia3cli.cli.docs {path}`", file=sys.stderr)
            return 1
        return 0
    path.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
