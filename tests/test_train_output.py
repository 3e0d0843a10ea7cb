"""What a user reads on the console during a real run of train.py: no noise from other libraries,
each line once and on its own line.

One 2-rank DeepSpeed ZeRO-3 run over gloo (the tiny model on the bundled photos, one of which is
grayscale, with the progress bar on), both ranks writing into one log as torchrun shows them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "framer_dist" / "train.py"
TINY = REPO / "configs" / "tiny_cpu_demo.toml"
PHOTOS = REPO / "framer_dist" / "assets" / "photos"
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], log: Path, timeout: float = 300) -> list[int]:
    """``world`` ranks of train.py with the env torchrun sets, all writing into ``log``; no
    warning filter of our own (PYTHONWARNINGS) and the progress bar on, as a user runs it."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "FRAMER_NO_PROGRESS")}
    procs = []
    with open(log, "w") as fh:
        for r in range(world):
            procs.append(subprocess.Popen(
                [sys.executable, str(TRAIN), *args], stdout=fh, stderr=subprocess.STDOUT,
                env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                         LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                         TORCH_EXTENSIONS_DIR=str(log.parent / "torch_ext"), PYTHONPATH=str(REPO)),
                start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.05)
    return [p.returncode for p in procs]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("zero3_output")
    ds = tmp / "zero3.json"  # the shipped ZeRO-3 settings, tiny buckets: params really partitioned
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                     "reduce_bucket_size": 1 << 20,
                                     "stage3_prefetch_bucket_size": 1 << 20})
    ds.write_text(json.dumps(cfg))
    out = tmp / "run"
    log = tmp / "run.log"
    rc = launch(2, ["--config", str(TINY), "--ds", str(ds), "--out", str(out),
                    f'data.path="{PHOTOS.as_posix()}"', "data.batch_size=2", f"train.steps={STEPS}",
                    "log.every=2", "log.heatmap_every=0", "log.val_every=0", "checkpoint.every=0"],
                log)
    text = log.read_text()
    assert rc == [0, 0], text[-4000:]
    return {"out": out, "text": text, "lines": text.replace("\r", "\n").splitlines()}


def test_deepspeed_deprecated_collective_warnings_are_silenced(zero3_run):
    """torch's FutureWarnings about the collectives DeepSpeed calls (all_gather_into_tensor,
    reduce_scatter_tensor) were most of a ZeRO-3 run's output; they are gone, on both ranks."""
    text = zero3_run["text"]
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        assert name not in text, text[-4000:]
