"""Waiting in tests: on a state, never on a time budget that a slow machine can use up.

CI runs on 2 cores shared with other work, where a run that takes 40 s alone can take several
minutes. So a test waits for the thing it needs (a job done, a step logged, a process exited),
polling finely, and gives up only at ``HANG_S``: a bound that only a hang reaches. Then it fails
with what it waited for and the logs. pytest-timeout (pyproject, per test) is longer still: the
last guard, for a test that hangs outside these helpers.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

HANG_S = 20 * 60   # one wait; pyproject's per-test timeout (30 min) is longer
POLL_S = 0.02      # how often a state is looked at


class Hang(AssertionError):
    """A wait reached HANG_S: the thing waited for is stuck, not slow."""


def wait_until(ready: Callable[[], bool], what: str, *, alive: Callable[[], bool] | None = None,
               ended: str = "", details: Callable[[], str] | None = None,
               bound: float = HANG_S, poll: float = POLL_S, on_hang: Callable[[], None] | None = None
               ) -> None:
    """Return as soon as ``ready()``. Fail at once (AssertionError ``ended``) if ``alive()`` turns
    False first: what was to get ready has gone. Fail with ``Hang`` after ``bound`` seconds, after
    ``on_hang()`` (stop what hangs), with ``details()`` (its logs) in the message."""
    start = time.monotonic()
    while not ready():
        if alive is not None and not alive():
            if ready():  # got ready and ended between the two looks
                return
            raise AssertionError(f"{ended or 'it ended'} (waiting for {what})"
                                 + (f"\n{details()}" if details else ""))
        waited = time.monotonic() - start
        if waited > bound:
            if on_hang is not None:
                on_hang()
            raise Hang(f"{what}: not after {waited:.0f} s (only a hang takes that long)"
                       + (f"\n{details()}" if details else ""))
        time.sleep(poll)


def wait_exit(proc: subprocess.Popen, what: str, *, details: Callable[[], str] | None = None,
              bound: float = HANG_S, poll: float = POLL_S) -> int:
    """``proc``'s exit code once it has exited; ``Hang`` (process killed) if it runs past ``bound``."""
    wait_until(lambda: proc.poll() is not None, what, details=details, bound=bound, poll=poll,
               on_hang=proc.kill)
    return proc.returncode


def tail(paths: list[Path], n: int = 3000) -> str:
    """The last ``n`` characters of each existing file, headed by its name."""
    text = ""
    for p in paths:
        if p.is_file():
            text += f"--- {p}\n{p.read_text(errors='replace')[-n:]}\n"
    return text or "(no logs)"



def run_exits_before_listening(cmd: list[str], port: int, *, bound: float = HANG_S,
                               poll: float = POLL_S, **popen_kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` (text output captured) to its exit, and fail at once if it listens on ``port``
    first. Started as rank 0 of a process group with MASTER_PORT=``port``, a process that listens
    there has reached the rendezvous (rank 0 hosts the store) and would block waiting for the
    other ranks: this is how a test sees that a check did *not* run before the process group,
    without a time limit standing for "it would have blocked"."""
    import tempfile

    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **popen_kw)

        def listening() -> bool:
            try:
                conns = psutil.Process(proc.pid).net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return False
            return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)

        def output() -> str:
            out.seek(0)
            err.seek(0)
            return out.read()[-3000:] + err.read()[-3000:]

        try:
            wait_until(lambda: proc.poll() is not None, f"{cmd[:3]} to exit",
                       alive=lambda: not listening(), details=output, bound=bound, poll=poll,
                       ended=f"it listens on port {port}: it reached the process group (and would "
                             "block there) before it exited")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
