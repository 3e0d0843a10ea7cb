"""Start ``world`` ranks of a command with the environment torchrun sets, all writing into one
log, and wait for them on their state (tests/_waiting.py): each rank's own exit code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _waiting import HANG_S, wait_until  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(base: dict[str, str], rank: int, world: int, port: int) -> dict[str, str]:
    return dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every process group still running (each rank started its own session), and reap."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def run_ranks(cmd: list[str], world: int, log: Path, env: dict[str, str],
              during: Callable[[list[subprocess.Popen]], bool] | None = None,
              bound: float = HANG_S, poll: float = 0.02) -> list[int]:
    """Ranks 0..world-1 of ``cmd`` with ``env`` plus the launcher's variables; ``during(procs)``
    is polled while they run (to kill or signal them) until it returns True. They run to the end
    however long a slow machine takes; only a hang reaches ``bound``: then every rank is killed
    and the failure shows the log."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    with open(log, "w") as fh:
        for r in range(world):
            procs.append(subprocess.Popen(cmd, env=rank_env(env, r, world, port), stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True))

        def ended() -> bool:
            nonlocal during
            if during is not None and during(procs):
                during = None
            return all(p.poll() is not None for p in procs)

        try:
            wait_until(ended, f"{world} ranks of {Path(cmd[1]).name} ({log.name}) to exit",
                       bound=bound, poll=poll, on_hang=lambda: kill_all(procs),
                       details=lambda: log.read_text(errors="replace")[-6000:])
        finally:
            kill_all(procs)
    return [p.returncode for p in procs]
