"""User-facing errors.

Library code raises these; only ``ia3cli.cli.app`` prints them. Each carries a short message naming the key, file or
row at fault and a hint saying how to fix it. ``exit_code`` is 2 for bad input and 1 for a run that failed.
"""

from __future__ import annotations


class Ia3Error(Exception):
    """An error the user can fix; shown without a traceback.

    Args:
        message: What is wrong, naming the key, file or row.
        hint: How to fix it (optional).
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class RecipeError(Ia3Error):
    """A recipe key has a bad value, or several do (``message`` then lists them all).

    Args:
        key: Dotted key path, e.g. ``training.learning_rate`` (or ``None`` for the file as a whole).
        message: What is wrong.
        hint: How to fix it.
    """

    def __init__(self, key: str | None, message: str, hint: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message, hint)
        self.key = key


class DataError(Ia3Error):
    """A data file or row is unusable.

    Args:
        file: The file (or dataset id) at fault.
        row: 1-based row number in that file/split, or ``None`` when the whole file is at fault.
        message: What is wrong.
        hint: How to fix it.
    """

    def __init__(self, file: str, row: int | None, message: str, hint: str | None = None) -> None:
        where = f"{file}, row {row}" if row is not None else str(file)
        super().__init__(f"{where}: {message}", hint)
        self.file = file
        self.row = row


class RunError(Ia3Error):
    """A run could not complete (environment, disk, a diverged training); exit status 1."""

    exit_code = 1


class Preempted(Ia3Error):
    """The run was told to stop (SIGTERM, SIGUSR1), saved a checkpoint and stopped; ``ia3 train --resume`` continues.

    Its exit status, 75 (``EX_TEMPFAIL``: try again later), lets a requeue script tell it from a failure.
    """

    exit_code = 75
    label = "preempted"
