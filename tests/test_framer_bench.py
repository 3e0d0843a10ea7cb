"""The FRAMER loss benchmark still runs (tiny shape, CPU) and writes a complete result file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _waiting import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_runs(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "framer_loss.py"), "--tiny", "--threads", "1",
                    "--out", str(out)], check=True, timeout=HANG_S,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    r = json.loads(out.read_text())
    assert r["losses_agree"] is True
    assert r["shape"]["students"] == [3, 2, 2, 8, 8]
    for impl in ("ours", "ref"):
        assert len(r["seconds"][impl]["all"]) == r["reps"] and r["seconds"][impl]["median"] > 0
        assert r["peak_memory_bytes"][impl] >= 0
    assert r["speedup_median"] > 0 and r["versions"]["torch"] and r["command"] and r["date_utc"]
