"""What ia3 commands print: lines and one progress bar, on a terminal or into a log.

Every command prints through one :class:`Console`, so all of them look alike and none of them leaves carriage-return
debris in a log file::

    from ia3cli.report.console import Console

    console = Console()                               # tty=None: detect; Console(enabled=False) prints nothing
    console.line("pre-flight ok: ...")                # one line (above the bar while one is shown)
    with console.progress(total=200, desc="train") as bar:
        for step in range(200):
            bar.advance(1, loss=0.4312, lr=2e-3, health="ok")   # fields shown after the count, in this order
            if step == 99:
                bar.update(health="warning")          # change fields without advancing
                console.line(console.event("eval", "100/200", {"accuracy": 0.84}))
    # bar.goto(n, defer=True, ...) then bar.refresh(): set the count now, print the plain line once more fields are in
    with console.stages() as progress:               # one bar per stage, for plain progress callbacks
        evaluation.evaluate(..., progress=progress)   # calls progress("loss", rows_done, total), then "rank", ...

On a terminal (``tty``) the bar redraws in place (``rich``) and lines print above it. Elsewhere (CI, ``> log``, under
``torchrun``, ``TERM=dumb``) nothing is redrawn: the bar prints one plain line every ``every`` steps (default: a
tenth of ``total``) and when it closes::

    train  40/200   20%  loss 0.4312  lr 2.0e-03  health ok  [12s]

:func:`fmt` is the one number format (4 decimals, or 2 significant digits in scientific notation for very small or
large values); :meth:`Console.event` builds the ``tag  where  key value ...`` lines the commands print for
evaluations, health checks and stages, so that they line up with the plain progress lines.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from ia3cli.env import dumb_terminal, world_size

TAG_WIDTH = 7
"""Width of the tag column (``train``, ``eval``, ``health``, ``merge``...)."""


def fmt(value: Any) -> str:
    """A value as the console shows it: floats with 4 decimals, or ``1.2e-05`` when tiny or huge; others as str."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.1e}"
    return f"{value:.4f}"


def fields_text(fields: Mapping[str, Any]) -> str:
    """``key value`` pairs separated by two spaces; a ``None`` value is left out, an empty key shows the value alone."""
    return "  ".join(f"{k} {fmt(v)}" if k else fmt(v) for k, v in fields.items() if v is not None)


def detect_tty(stream: TextIO | None = None) -> bool:
    """Whether redrawing in place is wanted: a terminal, not ``TERM=dumb``, not one of several launched processes."""
    stream = stream or sys.stdout
    if dumb_terminal() or world_size() > 1:
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _elapsed(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Console:
    """Lines and progress bars for one command (see the module docstring).

    Args:
        tty: Redraw in place; ``None`` detects it from the stream (see :func:`detect_tty`).
        enabled: ``False`` prints nothing (processes other than rank 0).
        sink: Where plain lines go instead of the stream (e.g. a list's ``append`` in tests); implies ``tty=False``.
        stream: The stream to write to (default: ``sys.stdout`` at the time of writing).
    """

    def __init__(
        self,
        tty: bool | None = None,
        *,
        enabled: bool = True,
        sink: Callable[[str], Any] | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self._stream = stream
        self.sink = sink
        self.enabled = enabled
        self.tty = False if sink is not None else (detect_tty(stream) if tty is None else tty)
        self._live: Progress | None = None

    @property
    def stream(self) -> TextIO:
        """The output stream (``sys.stdout`` unless one was given)."""
        return self._stream or sys.stdout

    def line(self, text: str) -> None:
        """Print one line (above the live bar on a terminal)."""
        if not self.enabled:
            return
        if self._live is not None and self._live.rich is not None:
            self._live.rich.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)
        elif self.sink is not None:
            self.sink(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    @staticmethod
    def event(tag: str, where: str, fields: Mapping[str, Any], note: str = "") -> str:
        """One event line: ``tag  where  key value ...  note``, aligned with the plain progress lines."""
        parts = [f"{tag:<{TAG_WIDTH - 1}} {where}", fields_text(fields), note]
        return "  ".join(p for p in parts if p)

    def progress(self, total: int | None, desc: str, *, every: int | None = None, start: int = 0) -> Progress:
        """A progress bar over ``total`` steps; use it as a context manager or call ``close()``.

        Args:
            total: Number of steps (``None``: unknown, the count alone is shown).
            desc: The tag in front (``train``, ``eval``, ...).
            every: Off a terminal, print a line every this many steps (default: a tenth of ``total``, at least 1).
            start: The count to start from (a resumed run).
        """
        return Progress(self, total, desc, every=every, start=start)

    def stages(self) -> Stages:
        """A ``progress(stage, n, total)`` callback that shows one bar per stage, in turn (see :class:`Stages`)."""
        return Stages(self)


class Progress:
    """One progress bar of a :class:`Console`; created by :meth:`Console.progress`.

    Fields (``loss=0.43``, ``health="ok"``) are shown after the count in the order first given; ``None`` hides one.
    """

    def __init__(self, console: Console, total: int | None, desc: str, *, every: int | None, start: int) -> None:
        self.console, self.total, self.desc = console, total, desc
        self.n = start
        self.fields: dict[str, Any] = {}
        self.every = max(1, every or (math.ceil(total / 10) if total else 10))
        self._t0 = time.monotonic()
        self._printed = start
        self._closed = False
        self.rich: Any = None
        self._task: Any = None
        if console.enabled and console.tty and console._live is None:
            self._start_rich()

    def _start_rich(self) -> None:
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.rich = RichProgress(
            TextColumn(f"{self.desc:<{TAG_WIDTH - 1}}", markup=False),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("<"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}", markup=False),
            console=RichConsole(file=self.console.stream, highlight=False),
            refresh_per_second=4,
        )
        self._task = self.rich.add_task(self.desc, total=self.total, completed=self.n, status="")
        self.rich.start()
        self.console._live = self

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Count ``n`` more steps and update the fields."""
        self.goto(self.n + n, **fields)

    def goto(self, n: int, *, defer: bool = False, **fields: Any) -> None:
        """Set the count to ``n`` (e.g. the Trainer's global step) and update the fields.

        ``defer``: do not print a due plain line yet (more fields for this step are coming; call :meth:`refresh`).
        """
        self.n = n
        self.update(**fields)
        if not defer:
            self.refresh()

    def refresh(self) -> None:
        """Off a terminal, print the plain line if one is due (``every`` steps since the last one)."""
        if self.rich is None and self.console.enabled and self.n - self._printed >= self.every:
            self._print_plain()

    def update(self, **fields: Any) -> None:
        """Change fields without advancing."""
        self.fields.update(fields)
        if self.rich is not None:
            self.rich.update(self._task, completed=self.n, status=fields_text(self.fields))

    def status_line(self) -> str:
        """The plain line: ``desc  n/total  pct  fields  [elapsed]``."""
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        pct = f"{100 * self.n // self.total:3d}%" if self.total else ""
        text = Console.event(self.desc, count, {"": pct} if pct else {})
        fields = fields_text(self.fields)
        return f"{text}  {fields}  [{_elapsed(time.monotonic() - self._t0)}]" if fields else text

    def _print_plain(self) -> None:
        self._printed = self.n
        self.console.line(self.status_line())

    def close(self) -> None:
        """Stop the bar: on a terminal the last state stays on screen; otherwise the final line is printed once."""
        if self._closed:
            return
        self._closed = True
        if self.rich is not None:
            self.rich.update(self._task, completed=self.n, status=fields_text(self.fields))
            self.rich.stop()
            self.console._live = None
            self.rich = None
        elif self.console.enabled and self.n != self._printed:
            self._print_plain()


class Stages:
    """``stages(stage, n, total)``: advance the bar of ``stage`` by ``n``; a new stage closes the previous bar.

    For library functions that report progress through a plain callback (``ia3cli.scoring.evaluation.Progress``) without
    knowing about the console. Use it as a context manager (or call ``close()``) so the last bar is closed.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.stage: str | None = None
        self.bar: Progress | None = None

    def __call__(self, stage: str, n: int, total: int) -> None:
        if stage != self.stage or self.bar is None:
            self.close()
            self.stage, self.bar = stage, self.console.progress(total, stage)
        self.bar.advance(n)

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the current stage's bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
