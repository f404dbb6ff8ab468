"""``ia3 cache list`` and ``ia3 cache clean``: what ia3cli keeps in ``$IA3CLI_CACHE`` and removing it."""

from __future__ import annotations

from typing import Annotated

import typer

from ia3cli.cli.common import DebugOpt, errors, examples

CACHE_EXAMPLES = (
    "ia3 cache list",
    "ia3 cache clean                       # every cached folder",
    "ia3 cache clean SmolLM2-135M-Instruct-Q8_0-1a2b3c4d5e6f7a8b",
)

cache_app = typer.Typer(
    help="List or empty ia3cli's cache (float32 copies of GGUF bases trained in 4/8-bit).",
    epilog=examples(*CACHE_EXAMPLES),
    no_args_is_help=True,
)


@cache_app.command("list", epilog=examples(CACHE_EXAMPLES[0]))
def list_(debug: DebugOpt = False) -> None:
    """Each cached folder: name, size, and the file it was made from."""
    with errors(debug):
        from ia3cli.env import cache_dir
        from ia3cli.models.cache import entries
        from ia3cli.outputs import human_bytes

        found = entries()
        if not found:
            typer.echo(f"the cache is empty ({cache_dir()})")
            return
        for entry in found:
            typer.echo(f"{entry.name}  {human_bytes(entry.bytes)}  from {entry.source}")
        typer.echo(f"{len(found)} folders, {human_bytes(sum(e.bytes for e in found))} in {cache_dir()}")


@cache_app.command("clean", epilog=examples(*CACHE_EXAMPLES[1:]))
def clean(
    names: Annotated[list[str] | None, typer.Argument(help="Folders to remove (default: all).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Remove cached folders (only those ia3cli wrote); they are rebuilt when needed."""
    with errors(debug):
        from ia3cli.models.cache import clean as remove
        from ia3cli.outputs import human_bytes

        removed = remove(names or None)
        freed = human_bytes(sum(e.bytes for e in removed))
        typer.echo(f"removed {len(removed)} cached folder{'s' if len(removed) != 1 else ''} ({freed})")
