"""What every ``ia3`` command shares: argument types, the examples epilog, quiet libraries and error rendering.

User errors (:class:`ia3cli.errors.Ia3Error`) print as one or two lines and exit 2 (bad input) or 1 (run failure);
``--debug`` shows the traceback instead. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from ia3cli.errors import Ia3Error
from ia3cli.models.device import DEVICE_HELP

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False, metavar="RECIPE")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", metavar="KEY=VALUE", help="Override a recipe key: section.key=value (YAML-typed, repeatable)."
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and library warnings.")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", help=DEVICE_HELP)]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show library warnings and the Trainer's raw log lines.")
]


RayOpt = Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster (pip install 'ia3cli[ray]').")]
RayAddressOpt = Annotated[
    str | None,
    typer.Option("--ray-address", help="Ray cluster to join (auto, or ray://HEAD:10001); default: start a local one."),
]


def check_ray(ray: bool, ray_only: dict[str, object]) -> None:
    """``--ray`` needs Ray installed, and the options that only mean something on Ray need ``--ray``.

    Args:
        ray: Whether ``--ray`` was given.
        ray_only: Those options by flag, ``None`` when not given.

    Raises:
        Ia3Error: naming the options, or the extra that installs Ray (exit 2).
    """
    given = [flag for flag, value in ray_only.items() if value is not None]
    if given and not ray:
        verb = "needs" if len(given) == 1 else "need"
        raise Ia3Error(f"{', '.join(given)} {verb} --ray", "add --ray, or leave them out to run in this process")
    if ray:
        try:
            import ray as _  # noqa: F401
        except ImportError:
            raise Ia3Error("--ray needs Ray, which is not installed", "pip install 'ia3cli[ray]'") from None


def examples(*lines: str) -> str:
    # "\b" keeps click from re-wrapping the block
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def quiet_libraries(debug: bool) -> None:
    if debug:
        return
    import logging
    import warnings

    # bitsandbytes warns at import about an optional CPU kernel package that needs the Hub
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import datasets
    import huggingface_hub

    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()


def say_error(text: str) -> None:
    # Under torchrun every rank fails together; one message (the main process's) is enough.
    from ia3cli.env import is_main_process

    try:
        main = is_main_process()
    except Ia3Error:  # a malformed RANK: better every process than none
        main = True
    if main:
        typer.echo(text, err=True)


@contextlib.contextmanager
def errors(debug: bool) -> Iterator[None]:
    """Turn known errors into a short message and an exit status; keep tracebacks for ``--debug``."""
    try:
        yield
    except Ia3Error as exc:
        if debug:
            raise
        say_error(f"{getattr(exc, 'label', 'error')}: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        say_error("interrupted")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        say_error(f"error: {type(exc).__name__}: {first}\n  hint: run again with --debug for the traceback")
        raise typer.Exit(1) from None
