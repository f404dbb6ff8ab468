"""Start-up: wall time of ``ia3 --help`` against ``python -c pass`` (and ``python -c "import torch"`` for scale).

Each command runs in a fresh subprocess; one warm-up round, then N interleaved rounds; medians. ``ia3 --help``
imports no torch (a test checks ``sys.modules``), so it should cost a small, fixed amount above bare Python.

Target: reported (no fixed target in the issue); ``ia3 --help`` should be far below ``import torch``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from _common import QUICK, median, write_result

ROUNDS = 3 if QUICK else 10
BIN = Path(sys.executable).parent
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "ia3 --help": [str(BIN / "ia3"), "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    for cmd in COMMANDS.values():
        wall(cmd)
    runs: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(ROUNDS):
        for name, cmd in COMMANDS.items():
            runs[name].append(wall(cmd))
    med = {name: median(ts) for name, ts in runs.items()}
    ratio = med["ia3 --help"] / med["python -c pass"]
    rows = [["startup", f"{name} (median of {ROUNDS})", f"{t * 1e3:.0f} ms", "", ""] for name, t in med.items()]
    extra_ms = (med["ia3 --help"] - med["python -c pass"]) * 1e3
    below_torch = med["ia3 --help"] < med["python -c 'import torch'"]
    rows.append(
        [
            "startup",
            "ia3 --help / python -c pass",
            f"{ratio:.1f}x (+{extra_ms:.0f} ms)",
            "< import torch",
            "met" if below_torch else "MISSED",
        ]
    )
    write_result(
        "startup",
        {
            "what": "subprocess wall time, median of interleaved rounds after one warm-up",
            "target": "report; ia3 --help below import torch",
            "settings": {"rounds": ROUNDS, "commands": COMMANDS},
            "runs": runs,
            "medians_s": med,
            "ratio_help_over_bare_python": ratio,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
