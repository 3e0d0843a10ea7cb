"""framer-sr and the layer-hierarchy analysis through the model-family seam: the toy family
(tests/_toy_family.py, defined outside the package) loads from an export that records it, samples
with its own option default and its own flag, and is analysed with a teacher of its own; the
trainer records the family beside its exports."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _toy_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def _toy_export(tmp_path: Path) -> Path:
    """A toy model saved as the toy family's export, with the trainer's family record."""
    from safetensors.torch import save_file

    import _toy_family
    from framer_dist.export import FAMILY_FILE

    torch.manual_seed(0)
    export = tmp_path / "export"
    (export / "toy").mkdir(parents=True)
    save_file(_toy_family.ToyNet().state_dict(), str(export / "toy" / _toy_family.WEIGHTS))
    (export / FAMILY_FILE).write_text(json.dumps({"family": "_toy_family:FAMILY"}))
    return export / "toy"


def _png(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_framer_sr_runs_the_family_its_export_records(tmp_path, monkeypatch, capsys):
    import _toy_family
    import framer_dist.models as models
    from framer_dist.infer.cli import main

    # registered families put their own flags on framer-sr's command line
    monkeypatch.setitem(models._REGISTRY, "toy", _toy_family.FAMILY)
    ckpt = _toy_export(tmp_path)
    _png(tmp_path / "in" / "a.png", 8, 12, 0)
    common = ["--checkpoint", str(ckpt), "--vae", "", "--text-encoders", "hashed", "--scale", "2",
              "--process-size", "0", "--no-progress", "--prompt", "x"]
    assert main([str(tmp_path / "in"), str(tmp_path / "o1")] + common) == 0
    assert f"loading the full checkpoint {ckpt / _toy_family.WEIGHTS}" in capsys.readouterr().err
    opts = _toy_family.SAMPLED[-1]
    assert opts.steps == 1 and opts.guidance == 8.0     # the family's default; the others stay
    assert opts.family_options == {"toy_gain": 1.0}
    assert Image.open(tmp_path / "o1" / "a.png").size == (24, 16)

    assert main([str(tmp_path / "in"), str(tmp_path / "o2"), "--steps", "3", "--toy-gain", "0"]
                + common) == 0
    opts = _toy_family.SAMPLED[-1]
    assert opts.steps == 3 and opts.family_options == {"toy_gain": 0.0}   # given flags win
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "o1" / "a.png")),
                              np.asarray(Image.open(tmp_path / "o2" / "a.png")))

    # --family overrides the record: the default family finds none of its checkpoints there
    capsys.readouterr()
    assert main([str(tmp_path / "in"), str(tmp_path / "o3"), "--family", "dit4sr"] + common) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path / "in"), str(tmp_path / "o3"), "--family", "nope"] + common) == 2
    assert "--family: unknown family 'nope'" in capsys.readouterr().err


def test_analysis_uses_the_familys_readout_and_its_own_teacher(tmp_path, capsys):
    from framer_dist.analysis import main

    ckpt = _toy_export(tmp_path)
    for i in range(2):
        _png(tmp_path / "hr" / f"{i}.png", 64, 64, i)
    common = ["--vae", "", "--images", str(tmp_path / "hr"), "--max-size", "64", "--device", "cpu"]
    assert main(["--checkpoint", f"toy={ckpt}", "--out", str(tmp_path / "out")] + common) == 0
    r = json.loads((tmp_path / "out" / "hierarchy.json").read_text())["models"]["toy"]
    assert r["num_blocks"] == 3 and r["teacher_layer"] is None
    assert len(r["t300"]["cos_lf"]) == 3
    # one VAE and one text encoder per run: checkpoints of two families are refused up front
    capsys.readouterr()
    assert main(["--checkpoint", f"toy={ckpt}", "--checkpoint", f"d={tmp_path / 'nothing'}",
                 "--out", str(tmp_path / "o2")] + common) == 2
    assert "different model families" in capsys.readouterr().err


def test_the_trainer_records_the_family_beside_its_exports(tmp_path):
    from framer_dist.config import load_config
    from framer_dist.export import FAMILY_FILE, export, read_family
    from framer_dist.infer.io import InferenceError
    from framer_dist.infer.loading import checkpoint_family

    def write(cfg, kinds, state, root):
        root.mkdir(parents=True, exist_ok=True)
        return {"control": root / "c.safetensors"}

    backend = SimpleNamespace(full_state_dict=dict, ema_state_dict=dict, is_main=True,
                              barrier=lambda: None)
    cfg = load_config(None, ['checkpoint.export=["control"]'])
    assert export(SimpleNamespace(export=write), cfg, backend, tmp_path) == {
        "control": tmp_path / "export" / "c.safetensors"}
    assert read_family(tmp_path / "export") == "dit4sr"
    assert read_family(tmp_path / "export" / "ema" / "lora" / "x.safetensors") == "dit4sr"
    assert read_family(tmp_path) is None          # nothing recorded: the caller's default
    (tmp_path / "export" / FAMILY_FILE).write_text("{")
    with pytest.raises(InferenceError, match="not a family record"):
        checkpoint_family(tmp_path / "export")
