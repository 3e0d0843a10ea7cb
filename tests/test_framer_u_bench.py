"""The FRAMER_U step benchmark runs on unet-tiny on CPU (so it cannot rot) and writes its record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _waiting import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def test_framer_u_bench_tiny_cpu(tmp_path: Path) -> None:
    out = tmp_path / "fu.json"
    cmd = [sys.executable, str(ROOT / "bench" / "framer_u_step.py"), "--steps", "2", "--resolution",
           "64", "--warmup", "1", "--block", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [s["stage"] for s in r["stages"]] == ["pix", "sem"]
    for s in r["stages"]:
        for kind in ("framer_on", "framer_off"):
            assert len(s[kind]["step_s_all"]) == 2 and s[kind]["step_s_median"] > 0
            assert s[kind]["peak_mem_gib"] is None   # CPU: time only
        for key in ("time_ratio", "time_ratio_turns_median"):
            assert isinstance(s[key], float) and s[key] > 0
        assert s["students"] == 6 and s["trainable_params"] > 0
    env = r["environment"]
    assert env["device"] == "cpu" and env["cpu_model"] and env["date"]
    assert all(env["versions"][k] for k in ("torch", "diffusers", "peft"))
    assert "framer_u_step.py" in r["command"] and r["load_avg_before"] is not None
