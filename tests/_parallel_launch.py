"""Start N ranks of tests/_parallel_worker.py with the env torchrun would set, and collect every
rank's own exit code (torchrun would fold them into one). If a rank dies abnormally the others
are stopped after a short grace period, as torchrun's agent does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _ranks import kill_all  # noqa: E402
from _waiting import HANG_S, wait_until  # noqa: E402
WORKER = HERE / "_parallel_worker.py"
NORMAL = (0, 75)  # 75: checkpoint.requeue_exit_code default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, phases: list[dict], bound: float = HANG_S) -> list[int]:
    """Run the phases on ``world`` ranks to the end, however long a slow machine takes; only a hang
    reaches ``bound``: then every rank is killed and the failure shows their logs."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / f"phases_{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(phases))
    port = free_port()
    procs, logs = [], []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
                   TORCH_EXTENSIONS_DIR=str(out / "torch_ext"),
                   PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(out / f"log_rank{r}_{spec.stem}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), str(spec)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    abnormal_at = None

    def ended() -> bool:
        nonlocal abnormal_at
        if all(p.poll() is not None for p in procs):
            return True
        now = time.monotonic()
        if abnormal_at is None and any(p.poll() not in (None, *NORMAL) for p in procs):
            abnormal_at = now
        if abnormal_at is not None and now - abnormal_at > 5:  # torchrun's agent: stop the rest
            kill()
        return False

    def kill() -> None:
        kill_all(procs)

    try:
        wait_until(ended, f"{world} ranks of {spec.name} to exit", bound=bound, on_hang=kill,
                   details=lambda: tail(out))
    finally:
        kill()
        for log in logs:
            log.close()
    return [p.returncode for p in procs]


def tail(out: Path, n: int = 3000) -> str:
    text = ""
    for f in sorted(out.glob("log_rank*.txt")):
        text += f"--- {f.name}\n" + f.read_text()[-n:]
    return text
