"""``ia3 train --nproc N``: hand the same command over to ``torch.distributed.run`` (torchrun), N processes.

There is no launcher of our own: this is exactly ``torchrun --standalone --nproc_per_node N -m ia3cli <argv>``, run
as a child process. A child rather than ``torch.distributed.run.main()`` in this process because the elastic agent
installs signal handlers and raises its own errors on a failed worker: as a child it keeps torchrun's exit status,
Ctrl-C handling and failure report unchanged, and this process only waits. ``--standalone`` picks a free local
rendezvous port, so two runs on one machine never collide. For several machines, or any other launcher option,
call ``torchrun`` or ``accelerate launch`` directly (see the README).
"""

from __future__ import annotations

import subprocess
import sys


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` minus ``--nproc N`` / ``--nproc=N``, so the workers do not launch again."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``ia3 <argv>`` (without ``--nproc``) in ``nproc`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "ia3cli",
        *without_nproc(argv),
    ]


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``ia3 <argv>`` in ``nproc`` processes on this machine through torchrun and return its exit status.

    Args:
        nproc: Number of processes (one per GPU; on a CPU-only machine, gloo processes).
        argv: The arguments after ``ia3`` (``sys.argv[1:]``), ``--nproc`` included or not.

    Returns:
        torchrun's exit status: 0 when every process succeeded, 1 when one failed (its error is printed above).
    """
    with subprocess.Popen(torchrun_command(nproc, argv)) as proc:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # torchrun got the same Ctrl-C: let it stop its workers instead of killing it
            return proc.wait()
