"""``ia3 train --nproc N``: hand the same command over to ``torch.distributed.run`` (torchrun), N processes.

There is no launcher of our own: this is exactly ``torchrun --standalone --nproc_per_node N -m ia3cli <argv>``, run
as a child process. A child rather than ``torch.distributed.run.main()`` in this process because the elastic agent
installs signal handlers and raises its own errors on a failed worker: as a child it keeps torchrun's exit status,
Ctrl-C handling and failure report unchanged, and this process only waits. ``--standalone`` picks a free local
rendezvous port, so two runs on one machine never collide. For several machines, or any other launcher option,
call ``torchrun`` or ``accelerate launch`` directly (see the README).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from ia3cli.errors import Preempted

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


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
        torchrun's exit status: 0 when every process succeeded, 1 when one failed (its error is printed above) or
        they were preempted (see :func:`preempted_status`).
    """
    with subprocess.Popen(torchrun_command(nproc, argv)) as proc:
        # A scheduler that stops a job signals this process (Kubernetes: PID 1 only). torchrun turns a SIGTERM into
        # a SIGTERM to each worker, which then checkpoints and stops (ia3cli.training.preemption); SIGUSR1 would
        # kill torchrun itself, so it is passed on as SIGTERM too.
        previous = {sig: signal.signal(sig, lambda *_: proc.send_signal(signal.SIGTERM)) for sig in FORWARDED}
        try:
            return proc.wait()
        except KeyboardInterrupt:  # torchrun got the same Ctrl-C: let it stop its workers instead of killing it
            return proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def preempted_status(status: int, output_dir: str) -> int:
    """torchrun's exit status, or 75 when the workers stopped because they were preempted (their ``run.json`` says
    so): torchrun itself reports any non-zero worker exit as a failure."""
    if status == 0:
        return status
    try:
        info = json.loads((Path(output_dir) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return status
    return Preempted.exit_code if isinstance(info, dict) and info.get("status") == "preempted" else status
