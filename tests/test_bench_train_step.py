"""The step benchmark runs on the tiny preset on CPU (so it cannot rot) and writes its records."""

import json
import subprocess
import sys
from pathlib import Path

from _waiting import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_bench_tiny_cpu(tmp_path: Path) -> None:
    out = tmp_path / "ts.json"
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--preset", "tiny", "--batch", "2",
           "--resolution", "64", "--steps", "2", "--warmup", "1", "--modes", "control",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["mode"] == "control" and run["backend"] == "none"
    for kind in ("baseline", "framer"):
        r = run[kind]
        assert len(r["step_s_all"]) == 2 and all(t > 0 for t in r["step_s_all"])
        assert r["img_per_s"] > 0
        assert r["model_tflop_per_step"] > 0
    # The FRAMER step carries the per-block readout heads: strictly more model FLOPs.
    assert run["framer"]["model_tflop_per_step"] > run["baseline"]["model_tflop_per_step"]
    assert result["environment"]["versions"]["torch"]
    assert "train_step.py" in result["command"]
    md = out.with_suffix(".md").read_text()
    assert "| control | none |" in md
