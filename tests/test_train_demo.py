"""`make demo` as a test: `python -m framer_dist.demo` end to end on the bundled photos, fewer steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _waiting import HANG_S

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO), FRAMER_NO_PROGRESS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "framer_dist.demo", "--out", str(out),
                           "--steps", "4", "--sample-steps", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S)
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


def test_package_data_patterns_match_files_in_the_package():
    """Every package-data pattern in pyproject.toml names files that exist inside framer_dist/
    (the run configs live at the repository root and are not package data)."""
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for pattern in data["framer_dist"]:
        assert [p for p in (REPO / "framer_dist").glob(pattern) if p.is_file()], pattern


def test_demo_reads_the_checkout_config_and_a_missing_one_is_a_clear_error(tmp_path, capsys):
    """The demo's one config is configs/tiny_cpu_demo.toml (no second copy of its values in code);
    without it (a non-checkout install) the demo says so in one line before touching --out."""
    import tomllib

    from framer_dist.demo import DEMO_CONFIG, PHOTOS, demo_config, main

    assert DEMO_CONFIG == REPO / "configs" / "tiny_cpu_demo.toml"
    toml = tomllib.loads(DEMO_CONFIG.read_text())
    cfg = demo_config(tmp_path / "demo", 4, [])
    assert cfg.data.resolution == toml["data"]["resolution"]
    assert cfg.data.num_workers == toml["data"]["num_workers"]
    assert cfg.checkpoint.keep_last == toml["checkpoint"]["keep_last"]
    assert cfg.framer.feature == toml["framer"]["feature"]
    assert cfg.data.path == PHOTOS.as_posix() and cfg.train.steps == 4
    missing = tmp_path / "no" / "tiny_cpu_demo.toml"
    assert main(["--out", str(tmp_path / "demo"), "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "demo config not found" in err and str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


def test_demo_finds_the_photos_training_reads(tmp_path, monkeypatch):
    """The demo lists its photos with the training sources' extension list: a .tif photo is
    shown by the demo and trained on (it used to be neither listed by the demo nor read)."""
    from PIL import Image

    import framer_dist.demo as demo
    from framer_dist.data.sources import FolderSource

    for name in ("a.jpg", "b.tif", "c.bmp"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "LICENSES.md").write_text("x")
    monkeypatch.setattr(demo, "PHOTOS", tmp_path)
    assert [p.name for p in demo._photos()] == ["a.jpg", "b.tif", "c.bmp"]
    assert [FolderSource(tmp_path).item_id(i) for i in range(3)] == ["a", "b", "c"]


def test_editable_install_prints_no_build_backend_warning_box(tmp_path):
    """`make venv` installs the checkout editable (pip install -e). That install prints nothing
    but pip's own lines: no setuptools "BuildBackendWarning: Editable installation" box, and the
    installed package imports from the checkout. (Into a scratch prefix, with the venv's setuptools.)"""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--no-index", "--prefix", str(tmp_path / "pfx"),
                           "-e", str(REPO)], capture_output=True, text=True, timeout=HANG_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "BuildBackendWarning" not in out and "Editable installation" not in out, out
    site = next((tmp_path / "pfx").glob("lib/python*/site-packages"))
    where = subprocess.run(
        [sys.executable, "-S", "-c", f"import site; site.addsitedir({str(site)!r}); "
         "import framer_dist; print(framer_dist.__file__)"],
        capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve() == (REPO / "framer_dist" / "__init__.py").resolve()
