"""`make demo` as a test: `python -m framer_dist.demo` end to end on the bundled photos, fewer steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO), FRAMER_NO_PROGRESS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "framer_dist.demo", "--out", str(out),
                           "--steps", "4", "--sample-steps", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    # it says where everything went, and it is there
    for label in ("checkpoint:", "TensorBoard logs:", "upscaled photo:", "layer hierarchy:"):
        assert label in text, text
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert {"framer/heatmap", "val/sr"} <= set(acc.Tags()["images"]), acc.Tags()
    val = acc.Images("val/sr")[-1]  # LR | SR | HR pixels of 2 samples, decoded
    assert (val.width, val.height) == (3 * 64, 2 * 64)
    assert (out / "export" / "dit4sr_control.safetensors").is_file()
    sr = sorted((out / "samples").glob("*_x4.png"))
    assert sr, list((out / "samples").iterdir())
    from PIL import Image
    img = Image.open(sr[0])
    r = 64  # configs/tiny_cpu_demo.toml data.resolution: bicubic | SR side by side
    assert img.size == (2 * r, r)
    assert (out / "analysis" / "layer_similarity.png").is_file()
    # the run trained on the bundled photos (folder source), not synthetic latents
    assert "photos" in (out / "config.toml").read_text()
