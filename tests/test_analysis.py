"""The layer-hierarchy analysis (paper Fig. 7 / Fig. 9): band metrics, PNG + JSON, clear errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from framer_dist.analysis import layer_band_metrics, main
from framer_dist.config import FramerConfig, ModelConfig
from framer_dist.models.dit4sr import build_model, save_model


@pytest.mark.parametrize("mask,feature_shape", [("radial", (2, 16, 8, 8)), ("teacher_quantile", (1, 8, 6, 10))])
def test_identical_features_have_similarity_one(mask, feature_shape):
    teacher = torch.randn(*feature_shape, generator=torch.Generator().manual_seed(0))
    feats = teacher[None].repeat(5, 1, 1, 1, 1)
    m = layer_band_metrics(feats, dataclasses.replace(FramerConfig(), mask=mask))
    for k in ("cos_lf", "cos_hf", "w_lf", "w_hf", "a_lf", "a_hf"):
        assert m[k].shape == (5,)
        torch.testing.assert_close(m[k], torch.ones(5), atol=1e-5, rtol=0)
    # a different layer is less similar, and only the teacher itself stays at 1
    feats[1] = torch.randn(*feature_shape, generator=torch.Generator().manual_seed(1))
    m = layer_band_metrics(feats, FramerConfig())
    assert m["cos_hf"][1] < 0.99 and m["cos_hf"][-1] == pytest.approx(1.0, abs=1e-5)


def _tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                  sample_size=32).save_pretrained(path)


def test_tool_writes_png_and_json_for_two_checkpoints(tmp_path, capsys):
    torch.manual_seed(0)
    base = build_model(ModelConfig(preset="tiny")).eval()
    save_model(base, tmp_path / "baseline")
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "_control" in n:
                p.add_(torch.randn_like(p) * 0.1)
    save_model(base, tmp_path / "framer")
    _tiny_vae(tmp_path / "vae")
    imgs = tmp_path / "hr"
    imgs.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (36, 28, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    common = ["--vae", str(tmp_path / "vae"), "--images", str(imgs), "--max-size", "32", "--device", "cpu"]
    rc = main(["--checkpoint", f"baseline={tmp_path / 'baseline'}", "--checkpoint",
               f"FRAMER={tmp_path / 'framer'}", "--out", str(tmp_path / "out")] + common)
    assert rc == 0
    res = json.loads((tmp_path / "out" / "hierarchy.json").read_text())
    assert res["timesteps"] == [300, 700] and res["num_images"] == 2
    assert list(res["models"]) == ["baseline", "FRAMER"]
    for r in res["models"].values():
        for t in ("t300", "t700"):
            assert set(r[t]) == {"cos_lf", "cos_hf", "w_lf", "w_hf", "a_lf", "a_hf"}
            assert len(r[t]["cos_hf"]) == r["num_blocks"] == 4
            assert r[t]["cos_lf"][-1] == pytest.approx(1.0, abs=1e-5)   # the final layer is the teacher
            assert r[t]["cos_hf"][-1] == pytest.approx(1.0, abs=1e-5)
            assert all(-1.0 <= v <= 1.0 + 1e-6 for v in r[t]["cos_hf"])
    # the two checkpoints differ, and so do their curves
    assert res["models"]["baseline"]["t300"]["cos_hf"] != res["models"]["FRAMER"]["t300"]["cos_hf"]
    for name in ("layer_similarity.png", "faw_fam_weights.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    capsys.readouterr()
    # clear errors: missing checkpoint, unreadable image
    assert main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")] + common) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (imgs / "bad.png").write_bytes(b"\x89PNG broken")
    assert main(["--checkpoint", str(tmp_path / "baseline"), "--out", str(tmp_path / "o3")] + common) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_tool_refuses_duplicate_labels_and_bad_timesteps(tmp_path, capsys):
    """Two checkpoints with the same label (`runs/a/export/transformer`, `runs/b/export/transformer`)
    used to draw one curve, the second replacing the first; a non-numeric --timesteps was a
    traceback. Both are one-line errors before any model is loaded."""
    a, b = tmp_path / "a" / "transformer", tmp_path / "b" / "transformer"
    common = ["--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(["--checkpoint", str(a), "--checkpoint", str(b)] + common) == 2
    err = capsys.readouterr().err
    assert "'transformer'" in err and "LABEL=PATH" in err
    assert main(["--checkpoint", str(a), "--timesteps", "300,abc"] + common) == 2
    assert "--timesteps" in capsys.readouterr().err


def test_layer_features_feed_fp32_timesteps_to_a_bf16_model():
    # as in training (flow.timesteps) and framer-sr: sigma * 1000 in fp32, not rounded to bf16
    from types import SimpleNamespace

    from framer_dist.models.dit4sr.readout import layer_features

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
            self.seen = []

        def forward(self, hidden_states, lr_latent, timestep, encoder_hidden_states,
                    pooled_projections, readout):
            self.seen.append(timestep)
            return SimpleNamespace(features=hidden_states[None])

    m = Stub()
    x0 = torch.randn(2, 16, 4, 4)
    layer_features(m, x0, x0, 0.3013, torch.randn_like(x0), torch.randn(1, 5, 32),
                   torch.randn(1, 32), "x0")
    assert m.seen[0].dtype == torch.float32
    assert torch.equal(m.seen[0], torch.full((2,), 0.3013 * 1000.0))
