"""The DiT4SR backbone: geometry, three-stream attention, MLP injection, readout, AC, input errors.

Tiny preset on CPU, fp32, real diffusers modules (no mocks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framer_dist.config import ModelConfig, load_config
from framer_dist.models.dit4sr import apply_training_mode, build_model, is_control_key
from framer_dist.parallel.blocks import ac_indices


def _inputs(b: int = 2, h: int = 6, w: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(b, 16, h, w, generator=g),
                lr_latent=torch.randn(b, 16, h, w, generator=g),
                timestep=torch.rand(b, generator=g) * 1000,
                encoder_hidden_states=torch.randn(b, 5, 32, generator=g),
                pooled_projections=torch.randn(b, 32, generator=g))


def _randomise_control(model, seed: int = 1) -> None:
    """Control layers away from their zero init, so the LR branch really acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_control_key(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="tiny"))
    _randomise_control(m)
    return m


def test_param_counts_sd35_medium_on_meta():
    m = build_model(ModelConfig(preset="sd3.5-medium"), device="meta")
    stock = sum(p.numel() for n, p in m.named_parameters() if not is_control_key(n))
    control = sum(p.numel() for n, p in m.named_parameters() if is_control_key(n))
    assert m.num_blocks == 24 and all(p.is_meta for p in m.parameters())
    assert round(stock / 1e9, 2) == 2.24, stock
    assert round(control / 1e6, 1) == 350.9, control
    # Exactly the spec's layers: per block q/k/v/out control in attn (24) and attn2 (13 dual
    # blocks) = 4 x (D^2 + D) each, plus a depth-wise 3x3 conv over 4D channels with bias.
    d = 1536
    assert control == (24 + 13) * 4 * (d * d + d) + 24 * (4 * d * 9 + 4 * d)
    # No unused extra text projections in attn2 (the release created them).
    blk = m.transformer_blocks[0]
    assert blk.attn2 is not None and blk.attn2.add_q_proj is None
    assert m.transformer_blocks[13].attn2 is None


def test_tiny_preset_exercises_every_path(tiny):
    blocks = tiny.transformer_blocks
    assert any(b.attn2 is not None for b in blocks), "needs a dual-attention block"
    assert blocks[0].attn.norm_q is not None, "needs the q/k RMS norm"
    assert blocks[-1].context_pre_only
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000


def test_fresh_control_layers_are_inert_projections():
    m = build_model(ModelConfig(preset="tiny"))
    x = torch.randn(2, 7, m.inner_dim)
    for blk in m.transformer_blocks:
        for attn in (blk.attn, blk.attn2):
            if attn is None:
                continue
            for name in ("q", "k", "v"):
                out = getattr(attn, f"to_{name}_control")(getattr(attn, f"to_{name}")(x))
                assert torch.count_nonzero(out) == 0
            assert torch.equal(attn.to_out_control.weight, attn.to_out[0].weight)
            assert torch.equal(attn.to_out_control.bias, attn.to_out[0].bias)
        assert torch.count_nonzero(blk.conv_control.weight) == 0


def _rms(t, weight, eps=1e-6):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


def _reference_attention(attn, hs, ctx, n):
    """Independent reference of the three-stream attention (explicit maths, no processor code)."""
    lin = lambda mod, t: t @ mod.weight.T + mod.bias  # noqa: E731
    heads = attn.heads
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    x, l = hs[:, :n], hs[:, n:]
    qx, kx, vx = lin(attn.to_q, x), lin(attn.to_k, x), lin(attn.to_v, x)
    ql = lin(attn.to_q_control, lin(attn.to_q, l))
    kl = lin(attn.to_k_control, lin(attn.to_k, l))
    vl = lin(attn.to_v_control, lin(attn.to_v, l))
    q = split(torch.cat([qx, ql], 1))
    k = split(torch.cat([kx, kl], 1))
    v = split(torch.cat([vx, vl], 1))
    q, k = _rms(q, attn.norm_q.weight), _rms(k, attn.norm_k.weight)  # LR keys normed as keys
    if ctx is not None:
        cq, ck, cv = (split(lin(m, ctx)) for m in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q = torch.cat([q, _rms(cq, attn.norm_added_q.weight)], 2)
        k = torch.cat([k, _rms(ck, attn.norm_added_k.weight)], 2)
        v = torch.cat([v, cv], 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
    a = a.transpose(1, 2).flatten(2)
    out_x = lin(attn.to_out[0], a[:, :n])
    out_l = lin(attn.to_out_control, a[:, n:2 * n] + l)
    out_c = lin(attn.to_add_out, a[:, 2 * n:]) if ctx is not None else None
    return torch.cat([out_x, out_l], 1), out_c


def test_three_stream_attention_matches_reference(tiny):
    from framer_dist.models.dit4sr.attention import LRJointAttnProcessor

    blk = tiny.transformer_blocks[0]
    n = 6
    hs, ctx = torch.randn(2, 2 * n, tiny.inner_dim), torch.randn(2, 5, tiny.inner_dim)
    proc = LRJointAttnProcessor()
    with torch.no_grad():
        got, got_c = proc(blk.attn, hs, ctx, n)
        want, want_c = _reference_attention(blk.attn, hs, ctx, n)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=1e-5)
        got2, none = proc(blk.attn2, hs, None, n)  # dual attention: [X | L], no text
        want2, _ = _reference_attention(blk.attn2, hs, None, n)
        torch.testing.assert_close(got2, want2, atol=1e-5, rtol=1e-5)
        assert none is None


def test_mlp_injection_respects_non_square_grid(tiny):
    blk = tiny.transformer_blocks[1]
    h, w, c = 3, 5, 4 * tiny.inner_dim
    act = torch.randn(2, 2 * h * w, c)
    with torch.no_grad():
        blk.conv_control.weight.zero_()
        blk.conv_control.bias.zero_()
        blk.conv_control.weight[:, 0, 1, 2] = 1.0  # out(i, j) = in(i, j + 1): a horizontal shift
        got = blk.inject_lr(act, (h, w))
    lr = act[:, h * w:].reshape(2, h, w, c)
    shifted = torch.zeros_like(lr)
    shifted[:, :, :-1] = lr[:, :, 1:]
    want_x = act[:, : h * w] + blk.lr_injection_scale * shifted.reshape(2, h * w, c)
    torch.testing.assert_close(got[:, : h * w], want_x)
    assert torch.equal(got[:, h * w:], act[:, h * w:])  # the LR half is left as it is


def test_lr_branch_changes_output(tiny):
    a, b = _inputs(), _inputs()
    b["lr_latent"] = b["lr_latent"] + 1.0
    with torch.no_grad():
        assert not torch.allclose(tiny(**a).sample, tiny(**b).sample)


def test_readout_last_layer_equals_output_and_inference_pays_nothing(tiny):
    x = _inputs()
    with torch.no_grad():
        before = tiny.readout_stats.forward
        plain = tiny(**x)
        assert plain.features is None and tiny.readout_stats.forward == before
        vel = tiny(**x, readout="velocity")
        hid = tiny(**x, readout="hidden")
    assert vel.features.shape == (4, 2, 16, 6, 10)
    assert torch.equal(vel.features[-1], plain.sample)
    assert torch.equal(vel.sample, plain.sample) and torch.equal(hid.sample, plain.sample)
    assert hid.features.shape == (4, 2, tiny.inner_dim, 3, 5)
    # hidden -> head == velocity readout, layer by layer (the grids are row-major token grids)
    temb = tiny.time_text_embed(x["timestep"], x["pooled_projections"])
    with torch.no_grad():
        for i in range(4):
            tokens = hid.features[i].flatten(2).transpose(1, 2)
            torch.testing.assert_close(tiny._head(tokens, temb, (3, 5)), vel.features[i])


def _loss_and_grads(model, x, ac):
    model.set_activation_checkpointing(ac)
    model.zero_grad(set_to_none=True)
    out = model(**x, readout="velocity")
    loss = out.sample.pow(2).mean() + out.features[:-1].square().mean(dim=(1, 2, 3, 4)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.set_activation_checkpointing([])
    return out.features.detach(), loss.detach(), grads


def test_activation_checkpointing_gives_identical_features_and_grads(tiny):
    x = _inputs()
    ref_f, ref_loss, ref_g = _loss_and_grads(tiny, x, [])
    assert len(ref_g) == sum(1 for _ in tiny.parameters())
    for ac in ([0, 1, 2, 3], [1, 3]):
        f, loss, g = _loss_and_grads(tiny, x, ac)
        assert torch.equal(f, ref_f) and torch.equal(loss, ref_loss)
        assert g.keys() == ref_g.keys()
        for n in g:
            torch.testing.assert_close(g[n], ref_g[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("mode,extra", [("none", []), ("all", []), ("every_k", ["parallel.ac_every_k=3"]),
                                        ("blocks", ["parallel.ac_blocks=[1, -1]"])])
def test_capture_exactly_once_per_block_per_step(tiny, mode, extra):
    cfg = load_config(None, [f"parallel.activation_checkpointing='{mode}'", *extra])
    idx = ac_indices(cfg.parallel, tiny.num_blocks)
    tiny.set_activation_checkpointing(idx)
    try:
        for step in range(2):
            s0 = (tiny.readout_stats.forward, tiny.readout_stats.recomputed)
            out = tiny(**_inputs(seed=step), readout="velocity")
            assert tiny.readout_stats.forward - s0[0] == tiny.num_blocks
            assert out.features.shape[0] == tiny.num_blocks
            out.features.mean().backward()
            # Backward never captures; it recomputes the readout of checkpointed blocks only
            # (block + head are one checkpointed function, so no [B, N, D] per layer is kept).
            assert tiny.readout_stats.forward - s0[0] == tiny.num_blocks
            assert tiny.readout_stats.recomputed - s0[1] == len(idx)
    finally:
        tiny.set_activation_checkpointing([])
        tiny.zero_grad(set_to_none=True)
    assert {"none": [], "all": [0, 1, 2, 3], "every_k": [0, 3], "blocks": [1, 3]}[mode] == idx


@pytest.mark.parametrize("readout", ["velocity", "hidden"])
def test_non_square_latent_forward_backward(tiny, readout):
    x = _inputs(b=1, h=6, w=10)  # a 48 x 80 px image
    tiny.zero_grad(set_to_none=True)
    out = tiny(**x, readout=readout)
    assert out.sample.shape == (1, 16, 6, 10)
    (out.sample.mean() + out.features.mean()).backward()
    grads = [p.grad for p in tiny.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert tiny.transformer_blocks[1].conv_control.weight.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


def test_wrong_inputs_raise_clear_errors(tiny):
    def call(**changes):
        x = _inputs()
        x.update(changes)
        with torch.no_grad():
            tiny(**x)

    with pytest.raises(ValueError, match="lr_latent .* size of the noisy latent"):
        call(lr_latent=torch.randn(2, 16, 4, 10))
    with pytest.raises(ValueError, match=r"hidden_states .* \[B, 16, H, W\]"):
        call(hidden_states=torch.randn(2, 4, 6, 10))
    with pytest.raises(ValueError, match=r"lr_latent must be \[B, 16, H, W\]"):
        call(lr_latent=torch.randn(2, 3, 6, 10))
    with pytest.raises(ValueError, match="7x10 is not divisible by the patch size 2"):
        call(hidden_states=torch.randn(2, 16, 7, 10), lr_latent=torch.randn(2, 16, 7, 10))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        call(encoder_hidden_states=torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="readout"):
        x = _inputs()
        tiny(**x, readout="x0")
    with pytest.raises(ValueError, match="out of range"):
        tiny.set_activation_checkpointing([4])


def test_bf16_model_takes_fp32_inputs_with_readout_and_checkpointing():
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="tiny"), dtype=torch.bfloat16)
    m.set_activation_checkpointing([0, 2])
    out = m(**_inputs(b=1), readout="velocity")
    assert out.sample.dtype == torch.bfloat16 and out.features.shape == (4, 1, 16, 6, 10)
    out.features.float().mean().backward()
    assert m.transformer_blocks[0].attn.to_k_control.weight.grad is not None


def _saved_bytes(model, x, ac, readout, exclude_block_outputs=False):
    """Bytes autograd keeps for backward outside checkpointed regions (unique storages).
    ``exclude_block_outputs``: leave out the block outputs, which the checkpoints hold anyway
    (each is the next checkpoint's input)."""
    model.set_activation_checkpointing(ac)
    seen: dict[int, int] = {}
    outputs: set[int] = set()
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.add(o[1].untyped_storage().data_ptr()))
             for b in model.transformer_blocks] if exclude_block_outputs else []

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**x, readout=readout)
            loss = out.sample.square().mean()
            if readout:
                loss = loss + out.features[:-1].square().mean()
        loss.backward()
    finally:
        for hk in hooks:
            hk.remove()
    model.zero_grad(set_to_none=True)
    model.set_activation_checkpointing([])
    return sum(v for k, v in seen.items() if k not in outputs), out


def test_frozen_head_readout_runs_once_outside_the_checkpoint_and_keeps_no_tokens():
    """Control/LoRA: the head is frozen, so its readout runs after each checkpoint (no recompute)
    and keeps nothing per layer at width D beyond the block outputs the checkpoints hold anyway."""
    from framer_dist.models.dit4sr import DiT4SRTransformer, preset_geometry

    geo = preset_geometry("tiny")
    geo.update(num_attention_heads=4, attention_head_dim=32, caption_projection_dim=128)  # D=128
    torch.manual_seed(0)
    m = DiT4SRTransformer(**geo)
    apply_training_mode(m, "control")  # head and time embedding frozen
    assert not m.head_trainable
    b, h, w = 2, 8, 8
    x = _inputs(b=b, h=h, w=w)
    every = list(range(m.num_blocks))
    ref_f, ref_loss, ref_g = _loss_and_grads(m, x, [])
    s0 = (m.readout_stats.forward, m.readout_stats.recomputed)
    f, loss, g = _loss_and_grads(m, x, every)
    assert (m.readout_stats.forward - s0[0], m.readout_stats.recomputed - s0[1]) == (m.num_blocks, 0)
    assert torch.equal(f, ref_f) and torch.equal(loss, ref_loss)
    assert g.keys() == ref_g.keys() and any(is_control_key(n) for n in g)
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-6, atol=1e-7, msg=n)
    per_layer_tokens = b * (h // 2) * (w // 2) * 128 * 4  # one fp32 [B, N, D]
    base_ac, _ = _saved_bytes(m, x, every, None, exclude_block_outputs=True)
    with_ac, out = _saved_bytes(m, x, every, "velocity", exclude_block_outputs=True)
    # the features themselves plus per-token norm statistics, far below one [B, N, D] per layer
    assert with_ac - base_ac <= out.features.numel() * 4 + m.num_blocks * per_layer_tokens // 16
    # the measure is sensitive: counting the block outputs too, it sees them
    raw, _ = _saved_bytes(m, x, every, "velocity")
    assert raw - with_ac >= (m.num_blocks - 1) * 2 * per_layer_tokens  # [B, 2N, D] per block


def test_checkpointed_readout_keeps_no_per_layer_tokens():
    from framer_dist.models.dit4sr import DiT4SRTransformer, preset_geometry

    geo = preset_geometry("tiny")
    geo.update(num_attention_heads=4, attention_head_dim=32, caption_projection_dim=128)  # D=128
    torch.manual_seed(0)
    m = DiT4SRTransformer(**geo)
    b, h, w = 2, 8, 8
    x = _inputs(b=b, h=h, w=w)
    per_layer_tokens = b * (h // 2) * (w // 2) * 128 * 4  # one fp32 [B, N, D]
    every = list(range(m.num_blocks))
    base_ac, _ = _saved_bytes(m, x, every, None)
    with_ac, out = _saved_bytes(m, x, every, "velocity")
    # With AC the readout costs at most its own small output, nothing per layer at width D.
    assert with_ac - base_ac <= out.features.numel() * 4
    # Without AC the same measure does see the head's kept per-layer tokens (the test is sensitive).
    base, _ = _saved_bytes(m, x, [], None)
    without_ac, _ = _saved_bytes(m, x, [], "velocity")
    assert without_ac - base >= (m.num_blocks - 1) * per_layer_tokens
