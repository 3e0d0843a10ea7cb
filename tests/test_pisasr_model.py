"""The pisasr family's model (docs/specs/framer_u.md): counts, the block-by-block forward against
stock diffusers, the FRAMER readout, exactly-once capture under activation checkpointing, the
LoRA sets per stage. unet-tiny at 16x16 latents; sd2.1-base only on the meta device."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import UNet2DConditionModel  # noqa: E402

from framer_dist.models.pisasr import lora as L  # noqa: E402
from framer_dist.models.pisasr.loading import PretrainedLoadError, build_model, build_unet  # noqa: E402
from framer_dist.models.pisasr.presets import preset_config  # noqa: E402
from framer_dist.models.pisasr.unet import PiSASRUNet, hf_student_mask  # noqa: E402


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _inputs(b=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, h, w, generator=g), torch.randn(b, 5, 16, generator=g)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = build_model("unet-tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero LoRA (B starts at 0) so every adapter changes the output
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _stock_copy(model) -> UNet2DConditionModel:
    """A plain diffusers U-Net holding the wrapped model's base weights (LoRA dropped)."""
    stock = UNet2DConditionModel(**preset_config("unet-tiny"))
    sd = {k.replace(".base_layer.", "."): v for k, v in model.unet.state_dict().items()
          if ".lora_" not in k}
    stock.load_state_dict(sd, strict=True)
    return stock.eval()


def _set_lora_scale(model, scale: float) -> None:
    from peft.tuners.lora import LoraLayer

    for m in model.unet.modules():
        if isinstance(m, LoraLayer):
            for a in m.lora_A:
                m.set_scale(a, scale)


# ---------------------------------------------------------------------- counts


def test_sd21_base_counts_on_meta():
    unet = build_unet("sd2.1-base", device="meta")
    assert _count(unet.parameters()) == 865_910_724
    release = L.release_targets(unet)  # PiSA-SR's own selection rule
    for part in L.PARTS:
        assert [n for n, _ in unet.named_modules() if re.fullmatch(L.TARGETS[part], n)] == release[part]
    with torch.device("meta"):
        m = PiSASRUNet(unet)
        L.add_lora_sets(m.unet)
    assert m.num_blocks == 9 and isinstance(m.blocks, tuple)
    for s in L.SETS:
        assert _count(p for _, p in L.lora_parameters(m, s)) == 4_055_712
    assert _count(m.framer_heads.parameters()) == 2_560_000
    # the spec's feature table at 512 px
    assert m.block_channels == (320, 640, 1280, 1280, 1280, 1280, 1280, 640, 320)
    assert [g[0] for g in m.block_grids((64, 64))] == [32, 16, 8, 8, 8, 16, 32, 64, 64]
    # HF terms only for students with s > r*S (r = 0.2, S = 64): layers 2-4 are coarse
    mask = hf_student_mask(m.block_grids((64, 64))[:-1], (64, 64), 0.2, "skip")
    assert mask.tolist() == [True, True, False, False, False, True, True, True]
    assert hf_student_mask(m.block_grids((64, 64))[:-1], (64, 64), 0.2, "keep").all()


def test_tiny_counts(tiny):
    base = _count(p for n, p in tiny.unet.named_parameters() if ".lora_" not in n)
    assert base == 370_500
    for s in L.SETS:
        assert _count(p for _, p in L.lora_parameters(tiny, s)) == 60_320
    assert _count(tiny.framer_heads.parameters()) == 2_816
    assert tiny.num_blocks == 7 and len(tiny.framer_heads) == 6
    plain = build_unet("unet-tiny")
    release = L.release_targets(plain)  # same split and targets as SD2.1-base
    for part in L.PARTS:
        assert [n for n, _ in plain.named_modules() if re.fullmatch(L.TARGETS[part], n)] == release[part]
    # blocks are the unet's own modules; parameters are registered once, under unet.*
    assert tiny.blocks[0] is tiny.unet.down_blocks[0] and tiny.blocks[3] is tiny.unet.mid_block
    names = [n for n, _ in tiny.named_parameters()]
    assert all(n.startswith(("unet.", "framer_heads.")) for n in names) and len(names) == len(set(names))
    modules = dict(tiny.named_modules())
    assert tiny.readout_head_modules == ("unet.conv_norm_out", "unet.conv_out", "framer_heads")
    assert all(n in modules for n in tiny.readout_head_modules)
    # unet-tiny's coarsest grid is S/4: at r = 0.2 no student is coarse, at r = 0.25 three are
    grids = tiny.block_grids((32, 32))[:-1]
    assert hf_student_mask(grids, (32, 32), 0.2).all()
    assert hf_student_mask(grids, (32, 32), 0.25).tolist() == [True, False, False, False, True, True]


def test_heads_orthogonal_seeded_and_no_bias():
    a = PiSASRUNet(build_unet("unet-tiny"), head_seed=3)
    b = PiSASRUNet(build_unet("unet-tiny"), head_seed=3)
    c = PiSASRUNet(build_unet("unet-tiny"), head_seed=4)
    for ha, hb, hc in zip(a.framer_heads, b.framer_heads, c.framer_heads):
        assert ha.bias is None and ha.kernel_size == (1, 1)
        assert torch.equal(ha.weight, hb.weight) and not torch.equal(ha.weight, hc.weight)
        w = ha.weight.flatten(1)  # [C_0, C_i]
        eye = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(eye, torch.eye(eye.shape[0]), atol=1e-5, rtol=0)
    assert PiSASRUNet(build_unet("unet-tiny"), heads=False).framer_heads is None


# ---------------------------------------------------------------------- forward


@pytest.mark.parametrize("hw", [(16, 16), (18, 14)])
def test_forward_equals_stock_diffusers(tiny, hw):
    """LoRA scale 0 and the heads unused: our block loop == stock UNet2DConditionModel.forward; and
    with the LoRA active, == the stock forward of the same (LoRA-wrapped) U-Net."""
    z, c = _inputs(h=hw[0], w=hw[1])
    stock = _stock_copy(tiny)
    with torch.no_grad():
        _set_lora_scale(tiny, 0.0)
        try:
            ours = tiny(z, c)
        finally:
            _set_lora_scale(tiny, 1.0)
        ref = stock(z, 1, c).sample
        torch.testing.assert_close(ours.sample, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.z_h, z - ref, atol=1e-6, rtol=0)
        for sets in (("pix",), ("pix", "sem")):
            with L.using_sets(tiny.unet, sets):
                ours = tiny(z, c).sample
                ref_l = tiny.unet(z, 1, c).sample
            torch.testing.assert_close(ours, ref_l, atol=1e-6, rtol=0)
            assert (ours - ref).abs().max() > 1e-3  # the adapters really act


def test_block_grids_match_the_forward(tiny):
    shapes = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(
        tuple((o[0] if isinstance(o, tuple) else o).shape[-2:]))) for b in tiny.blocks]
    try:
        with torch.no_grad():
            tiny(*_inputs(b=1, h=18, w=14))
    finally:
        for h in hooks:
            h.remove()
    assert shapes == tiny.block_grids((18, 14))


def test_readouts_and_readout_off_runs_no_head(tiny):
    z, c = _inputs()
    calls = []
    hooks = [h.register_forward_hook(lambda *a: calls.append(1)) for h in tiny.framer_heads]
    try:
        with torch.no_grad():
            s0 = tiny.readout_stats.forward
            plain = tiny(z, c)
            assert plain.features is None and not calls and tiny.readout_stats.forward == s0
            x0 = tiny(z, c, readout="x0")
            vel = tiny(z, c, readout="velocity")
            hid = tiny(z, c, readout="hidden")
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 3 * 6 and tiny.readout_stats.forward - s0 == 3 * 6
    assert x0.features.shape == vel.features.shape == (7, 2, 4, 16, 16)
    assert hid.features.shape == (7, 2, 16, 16, 16)
    # the teacher (last entry) is the real output, per readout
    assert torch.equal(x0.features[-1], plain.z_h) and torch.equal(vel.features[-1], plain.sample)
    assert x0.features.dtype == torch.float32
    # student i: r_i = conv_out(SiLU(conv_norm_out(resize(P_i h_i)))), F_i = z_L - r_i
    with torch.no_grad():
        u = tiny.unet
        r = u.conv_out(F.silu(u.conv_norm_out(hid.features[:-1].flatten(0, 1)))).view(6, 2, 4, 16, 16)
    torch.testing.assert_close(vel.features[:-1], r, atol=1e-6, rtol=0)
    torch.testing.assert_close(x0.features[:-1], z - r, atol=1e-6, rtol=0)
    # the hidden readout is the head's output bilinearly resized (align_corners=False)
    grabbed = []
    hook = tiny.blocks[1].register_forward_hook(lambda m, i, o: grabbed.append(o[0]))
    try:
        with torch.no_grad():
            tiny(z, c)
    finally:
        hook.remove()
    want = F.interpolate(tiny.framer_heads[1](grabbed[0]), size=(16, 16), mode="bilinear",
                         align_corners=False)
    torch.testing.assert_close(hid.features[1], want, atol=1e-6, rtol=0)


def test_inference_model_without_heads_refuses_readout():
    m = PiSASRUNet(build_unet("unet-tiny"), heads=False)
    with pytest.raises(ValueError, match="heads=False"):
        m(*_inputs(), readout="x0")


# ---------------------------------------------------------------------- checkpointing


def _loss_and_grads(model, ac, readout="x0", seed=0):
    model.set_activation_checkpointing(ac)
    model.zero_grad(set_to_none=True)
    z, c = _inputs(seed=seed)
    try:
        out = model(z, c, readout=readout)
        loss = out.z_h.pow(2).mean() + out.features[:-1].float().square().mean(dim=(1, 2, 3, 4)).sum()
        loss.backward()
    finally:
        model.set_activation_checkpointing([])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.features.detach(), loss.detach(), grads


@pytest.mark.parametrize("stage", ["pix", "sem"])
def test_activation_checkpointing_same_features_and_grads_captured_once(tiny, stage):
    ids = {id(p) for p in L.apply_stage(tiny, stage)}
    trainable = {n for n, p in tiny.named_parameters() if id(p) in ids}
    try:
        ref_f, ref_loss, ref_g = _loss_and_grads(tiny, [])
        assert set(ref_g) == trainable  # every trainable parameter gets a gradient, nothing else
        for ac in (range(7), [1, 3, 6]):
            s0 = (tiny.readout_stats.forward, tiny.readout_stats.recomputed)
            f, loss, g = _loss_and_grads(tiny, ac)
            # taken once per student in the forward; backward only recomputes checkpointed readouts
            assert tiny.readout_stats.forward - s0[0] == 6
            assert tiny.readout_stats.recomputed - s0[1] == len([i for i in ac if i < 6])
            assert torch.equal(f, ref_f) and torch.equal(loss, ref_loss)
            assert g.keys() == ref_g.keys()
            for n in g:
                torch.testing.assert_close(g[n], ref_g[n], rtol=1e-5, atol=1e-7, msg=n)
    finally:
        L.apply_stage(tiny, "pix")


def test_checkpointing_hidden_readout_and_bad_indices(tiny):
    L.apply_stage(tiny, "pix")
    ref_f, _, ref_g = _loss_and_grads(tiny, [], readout="hidden")
    f, _, g = _loss_and_grads(tiny, range(7), readout="hidden")
    assert torch.equal(f, ref_f)
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-5, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="out of range"):
        tiny.set_activation_checkpointing([7])


# ---------------------------------------------------------------------- stages


def test_each_stage_trains_exactly_its_set_and_heads(tiny):
    pix = {n for n, _ in L.lora_parameters(tiny, "pix")}
    sem = {n for n, _ in L.lora_parameters(tiny, "sem")}
    heads = {n for n, _ in tiny.named_parameters() if n.startswith("framer_heads.")}
    assert pix and sem and not pix & sem and all("_pix." in n for n in pix)
    try:
        for stage, own, active in (("pix", pix, ("pix",)), ("sem", sem, ("pix", "sem"))):
            params = L.apply_stage(tiny, stage)
            names = {n for n, p in tiny.named_parameters() if p.requires_grad}
            assert names == own | heads and len(params) == len(names)
            assert L.active_sets(tiny.unet) == active
            L.apply_stage(tiny, stage, train_heads=False)  # framer.head_train = false
            assert {n for n, p in tiny.named_parameters() if p.requires_grad} == own
        with pytest.raises(ValueError, match="train.mode"):
            L.apply_stage(tiny, "both")
    finally:
        L.apply_stage(tiny, "pix")


def test_sem_step_leaves_pix_bit_identical(tiny):
    try:
        params = L.apply_stage(tiny, "sem")
        before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
        out = tiny(*_inputs(), readout="x0")
        (out.z_h.square().mean() + out.features[:-1].square().mean()).backward()
        opt.step()
        tiny.zero_grad(set_to_none=True)
        changed = {n for n, p in tiny.named_parameters() if not torch.equal(p, before[n])}
        sem = {n for n, _ in L.lora_parameters(tiny, "sem")}
        assert changed and changed <= sem | {n for n in before if n.startswith("framer_heads.")}
        assert any(n in sem for n in changed)
        with torch.no_grad():  # undo, the fixture is shared
            for n, p in tiny.named_parameters():
                p.copy_(before[n])
    finally:
        L.apply_stage(tiny, "pix")


def test_adjustable_inference(tiny):
    z, c = _inputs()
    with torch.no_grad():
        with L.using_sets(tiny.unet, ("pix",)):
            r_pix = tiny(z, c).sample
        with L.using_sets(tiny.unet, ("pix", "sem")):
            r_both = tiny(z, c).sample
    assert L.active_sets(tiny.unet) == ("pix",)
    torch.testing.assert_close(L.adjustable_residual(tiny, z, c, 1.0, 1.0), r_both, atol=1e-6, rtol=0)
    torch.testing.assert_close(L.adjustable_residual(tiny, z, c, 1.0, 0.0), r_pix, atol=1e-6, rtol=0)
    mix = L.adjustable_residual(tiny, z, c, 0.5, 2.0)
    torch.testing.assert_close(mix, 0.5 * r_pix + 2.0 * (r_both - r_pix), atol=1e-5, rtol=0)
    assert L.active_sets(tiny.unet) == ("pix",)


def test_merge_sets_gives_a_stock_unet():
    import copy

    torch.manual_seed(3)
    m = build_model("unet-tiny", heads=False)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    z, c = _inputs()
    for sets in (("pix",), ("pix", "sem")):
        with torch.no_grad(), L.using_sets(m.unet, sets):
            want = m(z, c).sample
        merged = L.merge_sets(copy.deepcopy(m), sets)
        assert type(merged) is UNet2DConditionModel and not hasattr(merged, "peft_config")
        assert _count(merged.parameters()) == 370_500
        assert set(merged.state_dict()) == set(UNet2DConditionModel(**preset_config("unet-tiny")).state_dict())
        with torch.no_grad():
            torch.testing.assert_close(merged(z, 1, c).sample, want, atol=1e-5, rtol=0)
    assert m.readout_head_modules == ("unet.conv_norm_out", "unet.conv_out")
    assert set(dict(m.named_modules())) >= set(m.readout_head_modules)


def test_lora_init_is_seeded_and_gaussian():
    a, b = (build_model("unet-tiny", lora_seed=5, heads=False) for _ in range(2))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for n in pa:
        if ".lora_" in n:
            assert torch.equal(pa[n], pb[n]), n
            if ".lora_B." in n:
                assert not pa[n].any()  # gaussian init: B = 0, so the adapters start as a no-op
    conv_out = a.unet.conv_out
    assert conv_out.scaling["default_decoder_pix"] == 2.0  # alpha 8 / rank 4


# ---------------------------------------------------------------------- loading


def test_load_pretrained_folder_and_geometry_mismatch(tmp_path):
    torch.manual_seed(2)
    src = UNet2DConditionModel(**preset_config("unet-tiny"))
    src.save_pretrained(tmp_path / "pipe" / "unet")
    unet = build_unet("unet-tiny", tmp_path / "pipe")
    for (n, p), q in zip(src.state_dict().items(), unet.state_dict().values()):
        assert torch.equal(p, q), n
    cfg_file = tmp_path / "pipe" / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["cross_attention_dim"] = 32
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(PretrainedLoadError, match="'cross_attention_dim'") as e:
        build_unet("unet-tiny", tmp_path / "pipe")
    assert "\n" not in str(e.value)
    with pytest.raises(PretrainedLoadError, match="not found"):
        build_unet("unet-tiny", tmp_path / "nowhere")


@pytest.mark.parametrize("readout", ["x0", "hidden"])
def test_features_feed_the_framer_objective(tiny, readout):
    """select_layers' default (all_but_last) picks the heads' students and the real output as the
    teacher; the objective's gradient reaches the heads and the stage's LoRA set."""
    from framer_dist.config import FramerConfig
    from framer_dist.framer import framer_objective
    from framer_dist.framer.layers import select_layers

    students, teacher = select_layers(tiny.num_blocks, FramerConfig())
    assert students == list(range(6)) and teacher == 6
    try:
        L.apply_stage(tiny, "pix")
        out = tiny(*_inputs(), readout=readout)
        res = framer_objective(out.features[students], out.features[teacher], FramerConfig(),
                               torch.Generator().manual_seed(0))
        assert torch.isfinite(res.loss)
        res.loss.backward()
        grads = {n for n, p in tiny.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert any(n.startswith("framer_heads.") for n in grads)
        assert any("_pix." in n for n in grads) and not any("_sem." in n for n in grads)
    finally:
        tiny.zero_grad(set_to_none=True)


def _release_dict(model) -> dict:
    """``model``'s adapters saved the way PiSA-SR's ``save_model`` saves them, with the module lists
    its ``initialize_unet`` builds (its loop, copied here)."""
    from diffusers import UNet2DConditionModel

    from framer_dist.models.pisasr import preset_config

    l_grep = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
              "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
    enc, dec, oth = [], [], []
    for n, _ in UNet2DConditionModel(**preset_config("unet-tiny")).named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in l_grep:
            if pattern in n and ("down_blocks" in n or "conv_in" in n):
                enc.append(n.replace(".weight", ""))
                break
            elif pattern in n and ("up_blocks" in n or "conv_out" in n):
                dec.append(n.replace(".weight", ""))
                break
            elif pattern in n:
                oth.append(n.replace(".weight", ""))
                break
    sd = {}
    for s in ("pix", "sem"):
        sd[f"unet_lora_encoder_modules_{s}"], sd[f"unet_lora_decoder_modules_{s}"], \
            sd[f"unet_lora_others_modules_{s}"] = enc, dec, oth
        sd[f"lora_rank_unet_{s}"] = 4
    sd["state_dict_unet"] = {k: v.clone() for k, v in model.unet.state_dict().items() if "lora" in k}
    return sd


def test_pisasr_release_imports_as_a_lora_export(tiny, tmp_path):
    """PiSA-SR's released dict (saved as its code saves it) -> our LoRA export: framer-sr on it (with
    the base U-Net as --base) reproduces the releasing model; what does not fit is one line."""
    import subprocess
    import sys

    from framer_dist.infer.loading import load_model
    from framer_dist.models import ModelLoadError
    from framer_dist.models.pisasr.release import import_release

    rel = tmp_path / "pisa_sr.pkl"
    torch.save(_release_dict(tiny), rel)
    base = tmp_path / "base"
    stock = {k.replace(".base_layer", ""): v for k, v in tiny.unet.state_dict().items() if "lora" not in k}
    from diffusers import UNet2DConditionModel

    from framer_dist.models.pisasr import preset_config
    u = UNet2DConditionModel(**preset_config("unet-tiny"))
    u.load_state_dict(stock)
    u.save_pretrained(str(base / "unet"))
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(repo / "tools" / "import_pisasr.py"), str(rel),
                        "--preset", "unet-tiny", "--out", str(tmp_path / "imported")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model = load_model(tmp_path / "imported", base=base)  # the family from family.json
    z, c = _inputs()
    with torch.no_grad(), L.using_sets(tiny.unet, ("pix", "sem")):
        want = tiny(z, c).z_h
    with torch.no_grad():
        assert torch.equal(model(z, c).z_h, want)

    bad = _release_dict(tiny)
    bad["unet_lora_others_modules_sem"] = bad["unet_lora_others_modules_sem"][1:]
    torch.save(bad, tmp_path / "bad.pkl")
    with pytest.raises(ModelLoadError, match="unet_lora_others_modules_sem does not fit"):
        import_release(tmp_path / "bad.pkl", "unet-tiny", tmp_path / "x")
    bad = _release_dict(tiny)
    bad["lora_rank_unet_sem"] = 8
    torch.save(bad, tmp_path / "bad2.pkl")
    with pytest.raises(ModelLoadError, match="one rank"):
        import_release(tmp_path / "bad2.pkl", "unet-tiny", tmp_path / "x")
    torch.save({"state_dict_unet": {}}, tmp_path / "bad3.pkl")
    with pytest.raises(ModelLoadError, match="is not a PiSA-SR release: no 'unet_lora_encoder"):
        import_release(tmp_path / "bad3.pkl", "unet-tiny", tmp_path / "x")
    r = subprocess.run([sys.executable, str(repo / "tools" / "import_pisasr.py"),
                        str(tmp_path / "bad3.pkl"), "--preset", "unet-tiny", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "import_pisasr: error:" in r.stderr
