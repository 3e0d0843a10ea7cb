"""Pretrained loading, save/load round trip, training modes and LoRA/control export (tiny, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from framer_dist.config import ModelConfig
from framer_dist.models.dit4sr.config import LoraConfig
from framer_dist.models.dit4sr import (PretrainedLoadError, apply_training_mode, build_model,
                                is_control_key, load_control, load_lora, load_pretrained,
                                preset_geometry, save_control, save_lora, save_model)

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _inputs(b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(b, 16, 6, 10, generator=g),
                lr_latent=torch.randn(b, 16, 6, 10, generator=g),
                timestep=torch.rand(b, generator=g) * 1000,
                encoder_hidden_states=torch.randn(b, 5, 32, generator=g),
                pooled_projections=torch.randn(b, 32, generator=g))


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """A stock diffusers SD3.5-style transformer of the tiny geometry, saved three ways."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**preset_geometry("tiny"))
    with torch.no_grad():  # stock to_out[0] must differ from any fresh init of ours
        for p in model.parameters():
            p.add_(0.01)
    root = tmp_path_factory.mktemp("stock")
    model.save_pretrained(root / "plain")
    model.save_pretrained(root / "pipeline" / "transformer")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    assert (root / "sharded" / f"{WEIGHTS}.index.json").is_file()
    return model, root


@pytest.mark.parametrize("layout", ["plain", "pipeline", "sharded"])
def test_stock_folder_loads_every_tensor_equal(stock, layout):
    model, root = stock
    ours = build_model(ModelConfig(preset="tiny", pretrained=str(root / layout)))
    ref, got = model.state_dict(), ours.state_dict()
    assert set(got) - set(ref) == {k for k in got if is_control_key(k)}
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    # The new layers start from their DiT4SR values, to_out_control cloned AFTER loading.
    for blk, sblk in zip(ours.transformer_blocks, model.transformer_blocks):
        for a, sa in ((blk.attn, sblk.attn), (blk.attn2, sblk.attn2)):
            if a is None:
                continue
            assert torch.equal(a.to_out_control.weight, sa.to_out[0].weight)
            assert torch.equal(a.to_out_control.bias, sa.to_out[0].bias)
            assert a.to_out_control.weight.data_ptr() != a.to_out[0].weight.data_ptr()
            for name in ("to_q_control", "to_k_control", "to_v_control"):
                assert torch.count_nonzero(getattr(a, name).weight) == 0
        assert torch.count_nonzero(blk.conv_control.weight) == 0
    assert ours.lr_injection_scale == 1.2
    with torch.no_grad():
        assert torch.isfinite(ours(**_inputs()).sample).all()


def test_pretrained_errors_are_clear(stock, tmp_path):
    model, root = stock
    with pytest.raises(PretrainedLoadError, match="folder not found"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedLoadError, match="has no config.json"):
        load_pretrained(tmp_path / "empty")

    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(PretrainedLoadError, match="UNet2DConditionModel.*not an SD3"):
        load_pretrained(unet)

    with pytest.raises(PretrainedLoadError, match="geometry of model.preset='sd3.5-medium'"):
        build_model(ModelConfig(preset="sd3.5-medium", pretrained=str(root / "plain")))

    sd = load_file(root / "plain" / WEIGHTS)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((root / "plain" / "config.json").read_text())
    missing = dict(sd)
    del missing["transformer_blocks.1.attn.to_k.weight"]
    missing["transformer_blocks.9.attn.extra.weight"] = torch.zeros(1)
    save_file(missing, broken / WEIGHTS)
    with pytest.raises(PretrainedLoadError) as e:
        load_pretrained(broken)
    msg = str(e.value)
    assert "1 missing tensors: transformer_blocks.1.attn.to_k.weight" in msg
    assert "1 unexpected tensors: transformer_blocks.9.attn.extra.weight" in msg

    partial = dict(sd)
    partial["transformer_blocks.0.attn.to_q_control.weight"] = torch.zeros(32, 32)
    save_file(partial, broken / WEIGHTS)
    with pytest.raises(PretrainedLoadError, match="only some DiT4SR control tensors"):
        load_pretrained(broken)


@pytest.mark.parametrize("shard", ["10GB", "40KB"])
def test_save_load_roundtrip_whole_model(tmp_path, shard):
    torch.manual_seed(3)
    m = build_model(ModelConfig(preset="tiny"), lr_injection_scale=0.7)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if is_control_key(n):
                p.normal_(0, 0.1)
    save_model(m, tmp_path / "m", max_shard_size=shard)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["_class_name"] == "DiT4SRTransformer"
    back = load_pretrained(tmp_path / "m")
    assert back.lr_injection_scale == 0.7
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(m(**x).sample, back(**x).sample)


def _expected_trainable(model, mode):
    names = {n for n, _ in model.named_parameters()}
    if mode == "full":
        return names
    keep = {n for n in names if is_control_key(n)}
    if mode == "lora":
        keep |= {n for n in names if ".lora_A." in n or ".lora_B." in n}
    return keep


@pytest.mark.parametrize("mode", ["control", "lora", "full"])
def test_training_mode_grads_and_one_step(mode):
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="tiny"))
    params = apply_training_mode(m, mode, LoraConfig(rank=2, alpha=2.0, include_mlp=True))
    want = _expected_trainable(m, mode)
    named = dict(m.named_parameters())
    assert {n for n, p in named.items() if p.requires_grad} == want
    assert {id(p) for p in params} == {id(named[n]) for n in want}
    if mode == "lora":
        lora_mods = {n.split(".lora_")[0] for n in want if ".lora_" in n}
        assert any(n.endswith("attn.to_q") for n in lora_mods)
        assert any(n.endswith("attn2.to_out.0") for n in lora_mods)
        assert any(n.endswith("ff.net.2") for n in lora_mods)          # include_mlp
        assert not any("_control" in n for n in lora_mods)            # control layers train fully
        # LoRA B starts at zero, so A gets no gradient at the first step: start B elsewhere.
        with torch.no_grad():
            for n in want:
                if ".lora_B." in n:
                    named[n].normal_(0, 0.1)
    if mode == "control":
        assert sum(named[n].numel() for n in want) == sum(
            p.numel() for n, p in named.items() if is_control_key(n))
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    out = m(**_inputs(), readout="velocity")
    (out.sample.pow(2).mean() + out.features[:-1].pow(2).mean()).backward()
    assert {n for n, p in named.items() if p.grad is not None} == want
    opt.step()
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert changed <= want
    with_grad = {n for n in want if named[n].grad.abs().sum() > 0}
    assert with_grad and with_grad <= changed
    # The zero-initialised LR layers move at the first step in every mode. (to_q_control and
    # to_out_control only act through the still-zero k/v/conv paths, so their first gradient is
    # exactly zero, as with any zero-initialised control branch.)
    assert any("to_k_control" in n for n in changed) and any("to_v_control" in n for n in changed)
    assert any("conv_control" in n for n in changed)


def test_training_mode_errors():
    m = build_model(ModelConfig(preset="tiny"))
    with pytest.raises(ValueError, match="train.mode"):
        apply_training_mode(m, "partial", None)
    with pytest.raises(ValueError, match="dit4sr.lora.targets"):
        apply_training_mode(m, "lora", LoraConfig(targets=["no_such_proj"]))


def test_lora_export_reload_reproduces_outputs(stock, tmp_path):
    _, root = stock
    cfg = ModelConfig(preset="tiny", pretrained=str(root / "plain"))
    lora_cfg = LoraConfig(rank=4, alpha=8.0, include_mlp=True)
    m = build_model(cfg)
    params = apply_training_mode(m, "lora", lora_cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # stand-in for training: every trainable tensor away from its init
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x = _inputs()
    with torch.no_grad():
        want = m(**x, readout="velocity")
    lora_file = save_lora(m, tmp_path / "export")
    ctrl_file = save_control(m, tmp_path / "export")
    assert lora_file.is_file() and ctrl_file.is_file()
    keys = load_file(lora_file)
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    # the same file from plain parameter names (what a backend's gathered state dict holds)
    trainable = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    again = load_file(save_lora(m, tmp_path / "from_params", state_dict=trainable))
    assert again.keys() == keys.keys() and all(torch.equal(again[k], keys[k]) for k in keys)
    ctrl_again = load_file(save_control(m, tmp_path / "from_params", state_dict=trainable))
    assert ctrl_again.keys() == load_file(ctrl_file).keys()

    fresh = build_model(cfg)  # the same base weights, new process-equivalent state
    load_control(fresh, ctrl_file)
    load_lora(fresh, tmp_path / "export")
    with torch.no_grad():
        got = fresh(**x, readout="velocity")
    assert torch.equal(got.sample, want.sample) and torch.equal(got.features, want.features)
    with pytest.raises(ValueError, match="LoRA adapters"):
        save_model(m, tmp_path / "whole")


def test_bf16_release_folder_is_upcast_to_fp32_master_weights(stock, tmp_path):
    model, _ = stock
    bf = SD3Transformer2DModel.from_config(model.config)
    bf.load_state_dict(model.state_dict())
    bf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ours = build_model(ModelConfig(preset="tiny", pretrained=str(tmp_path / "bf16")))
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    w = ours.transformer_blocks[2].attn.to_out[0].weight
    assert torch.equal(w, model.transformer_blocks[2].attn.to_out[0].weight.bfloat16().float())
    assert torch.equal(ours.transformer_blocks[2].attn.to_out_control.weight, w)
    kept = load_pretrained(tmp_path / "bf16")  # the direct loader keeps the file's dtype
    assert kept.proj_out.weight.dtype == torch.bfloat16
    assert kept.transformer_blocks[0].conv_control.weight.dtype == torch.bfloat16


def _authors_folder(model, folder, extra: dict | None = None):
    """``model`` saved the way the DiT4SR authors' code saves theirs: their SD3Transformer2DModel
    copy's config and names (the LR conv under ff.control_conv) and, in the dual-attention blocks,
    attn2's context projections, which their forward computes but never uses."""
    sd = {}
    for k, v in model.state_dict().items():
        sd[k.replace(".conv_control.", ".ff.control_conv.")] = v.clone().contiguous()
    g = torch.Generator().manual_seed(7)
    for i, blk in enumerate(model.transformer_blocks):
        if blk.attn2 is None:
            continue
        inner, head = blk.attn2.to_q.weight.shape[0], blk.attn2.to_q.weight.shape[0] // blk.attn2.heads
        for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            sd[f"transformer_blocks.{i}.attn2.{name}.weight"] = torch.randn(inner, inner, generator=g)
            sd[f"transformer_blocks.{i}.attn2.{name}.bias"] = torch.randn(inner, generator=g)
        for name in ("norm_added_q", "norm_added_k"):
            sd[f"transformer_blocks.{i}.attn2.{name}.weight"] = torch.randn(head, generator=g)
    sd.update(extra or {})
    folder.mkdir(parents=True)
    cfg = dict(SD3Transformer2DModel(**preset_geometry("tiny")).config)
    cfg["_class_name"] = "SD3Transformer2DModel"
    (folder / "config.json").write_text(json.dumps(cfg, default=list))
    save_file(sd, str(folder / WEIGHTS))
    return sd


def test_the_authors_release_layout_loads_as_ours(tmp_path, capsys):
    """A folder in the DiT4SR authors' layout: the LR conv renamed, the unused attn2 tensors dropped
    with one line, and the same outputs as our own save of the same weights; a tensor that fits
    neither layout is refused by name (issue 17; their forward equals ours bit for bit)."""
    torch.manual_seed(4)
    m = build_model(ModelConfig(preset="tiny"))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if is_control_key(n):
                p.normal_(0, 0.1)
    sd = _authors_folder(m, tmp_path / "authors")
    n_dual = sum(blk.attn2 is not None for blk in m.transformer_blocks)
    assert n_dual >= 1 and any(".ff.control_conv." in k for k in sd)
    capsys.readouterr()
    back = load_pretrained(tmp_path / "authors", preset="tiny")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "authors' layout" in ln]
    n_conv = 2 * len(m.transformer_blocks)
    assert len(lines) == 1 and f"{n_conv} ff.control_conv tensors" in lines[0]
    assert f"{10 * n_dual} unused attn2 tensors dropped" in lines[0]
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(m(**x).sample, back(**x).sample)

    from framer_dist.infer.loading import load_model  # framer-sr --checkpoint: the same load
    served = load_model(tmp_path / "authors")
    assert all(torch.equal(served.state_dict()[k], a[k]) for k in a)

    _authors_folder(m, tmp_path / "odd", extra={"transformer_blocks.0.attn2.add_z_proj.weight":
                                                  torch.zeros(2)})
    with pytest.raises(PretrainedLoadError, match=r"1 unexpected tensors: transformer_blocks\.0\.attn2\.add_z_proj\.weight"):
        load_pretrained(tmp_path / "odd")
