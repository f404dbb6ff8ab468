"""The defaults of ``ia3 serve``, written once: the command line, :class:`~ia3cli.serving.app.Server` and
:func:`~ia3cli.serving.app.run` all take them from here. No heavy imports (``ia3 --help`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeDefaults:
    """What ``ia3 serve`` uses when a flag is not given."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_adapters: int = 64  # adapters kept loaded (LRU); a few MB each at most
    max_batch_size: int = 32  # rows in one forward
    max_wait_ms: float = 10.0  # longest wait of the oldest request for others to join its batch


DEFAULTS = ServeDefaults()
