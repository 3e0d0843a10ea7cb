"""Run a command as if the disk filled up: every file write past ``limit`` bytes fails (EFBIG).

``RLIMIT_FSIZE`` set in the child only, with SIGXFSZ ignored so the write returns an error instead
of killing the process: the closest a test gets to a crash or a full disk in the middle of a
write, with the real file system and no mock."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _waiting import HANG_S  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_with_file_size_limit(code: str, limit: int, timeout: float = HANG_S
                             ) -> subprocess.CompletedProcess:
    """``python -c code`` (the repository on PYTHONPATH) with file writes capped at ``limit``."""
    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap)
