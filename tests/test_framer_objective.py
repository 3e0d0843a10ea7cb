"""The FRAMER objective against the plain per-layer reference, gradients, masks, draws, bad input.

Shapes are tiny (CPU, shared cores). The reference (framer_dist/framer/reference.py) loops over
layers with two full fft2 calls each, fftshift, torch.quantile and F.normalize, and shares no code
with the vectorised objective.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import pytest
import torch

from framer_dist.config import FramerConfig
from framer_dist.framer import FramerResult, draw_negative_layers, framer_objective, select_layers
from framer_dist.framer.reference import reference_framer_loss
from framer_dist.framer.spectra import (column_weights, normalized_frequencies, radial_lf_mask,
                                        spectrum_magnitude, teacher_quantile_lf_mask)

# the one-key IntraCL warning is expected in the random_negatives = false cases (tested once below)
pytestmark = pytest.mark.filterwarnings("ignore:framer. random_negatives = false")

L, B, C, H, W = 4, 3, 2, 8, 10
CONTRACT_KEYS = ("w_lf", "w_hf", "a_lf", "a_hf", "l_intra", "l_inter", "cos_lf", "cos_hf")


def _raw_inputs(seed: int, shape, dtype):
    g = torch.Generator().manual_seed(seed)
    students = torch.randn(shape, generator=g).to(dtype)
    # a teacher correlated with the last layer, so cosines are not all ~0
    teacher = (0.7 * students[-1].float() + 0.3 * torch.randn(shape[1:], generator=g)).to(dtype)
    return students, teacher


def _twin_split(teacher: torch.Tensor, cutoff: float = 0.2) -> bool:
    """Does the plain full-fft2 quantile mask put the two members of a mirror pair
    (|S(k)| = |S(-k)| exactly in real arithmetic) on different sides?

    fft2 computes the two members with different rounding, so when the quantile lands on such a
    pair the plain definition splits it at random by 1 ulp; our half-spectrum path keeps both
    twins together (the exact-arithmetic answer). Equality tests use inputs without a split.
    """
    full = torch.fft.fft2(teacher.float()).abs()
    b, _, h, w = full.shape
    q = torch.quantile(full.reshape(b, -1), cutoff, dim=1)
    lf = full < q.view(b, 1, 1, 1)
    ky, kx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return not torch.equal(lf, lf[..., (-ky) % h, (-kx) % w])


def _inputs(seed: int = 0, shape=(L, B, C, H, W), dtype=torch.float32, cutoff: float | None = None):
    """Random inputs; with ``cutoff`` given, the first seed from ``seed`` whose teacher has no
    rounding-split twin at that quantile (see :func:`_twin_split`)."""
    for k in range(200):
        students, teacher = _raw_inputs(seed + 1000 * k, shape, dtype)
        if cutoff is None or not _twin_split(teacher, cutoff):
            return students.requires_grad_(), teacher
    raise AssertionError("no unambiguous teacher found")


def _cfg(**kw) -> FramerConfig:
    kw.setdefault("radius", 0.5)  # several LF bins at 8x10
    return FramerConfig(**kw)


def _run(cfg: FramerConfig, seed: int = 0, shape=(L, B, C, H, W), dtype=torch.float32):
    s, t = _inputs(seed, shape, dtype, cfg.cutoff if cfg.mask == "teacher_quantile" else None)
    res = framer_objective(s, t, cfg, torch.Generator().manual_seed(seed))
    res.loss.backward()
    g_ours = s.grad.clone()
    s.grad = None
    neg = res.negative_layers.tolist() if cfg.random_negatives else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_loss, ref_metrics = reference_framer_loss(s, t, cfg, neg)
    ref_loss.backward()
    return res, g_ours, ref_loss, ref_metrics, s.grad


def _assert_matches(cfg: FramerConfig, **kw) -> None:
    res, g_ours, ref_loss, ref_metrics, g_ref = _run(cfg, **kw)
    assert torch.isfinite(res.loss)
    torch.testing.assert_close(res.loss.detach(), ref_loss.detach().float(), rtol=1e-5, atol=1e-5)
    for k, v in ref_metrics.items():
        torch.testing.assert_close(res.metrics[k], v.float(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
    scale = g_ref.abs().max().item()
    if scale == 0:  # no contrast at all (no negatives of any kind): both give a zero gradient
        assert not cfg.random_negatives and not cfg.in_batch_negatives
        assert torch.all(g_ours == 0)
        return
    # bf16 leaves get bf16 gradients: both sides round the same fp32 gradient to bf16 (1 ulp apart)
    tol = 1e-5 if g_ours.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(g_ours.float() / scale, g_ref.float() / scale, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# equality with the reference


@pytest.mark.parametrize("mask", ["radial", "teacher_quantile"])
@pytest.mark.parametrize("faw,fam", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("random_negatives,in_batch", list(itertools.product([True, False], repeat=2)))
def test_matches_reference_all_switches(mask, faw, fam, random_negatives, in_batch):
    _assert_matches(_cfg(mask=mask, faw=faw, fam=fam, random_negatives=random_negatives,
                         in_batch_negatives=in_batch))


@pytest.mark.parametrize("mask", ["radial", "teacher_quantile"])
@pytest.mark.parametrize("extra", [
    {"faw_denominator": "teacher"}, {"faw_denominator": "none"},
    {"lf_loss": "inter", "hf_loss": "intra"}, {"lf_loss": "inter", "hf_loss": "inter"},
    {"lf_loss": "intra", "hf_loss": "intra"}, {"use_rfft": False}, {"tau": 0.2}, {"cutoff": 0.5},
    {"radius": 0.0}, {"radius": 0.2}, {"radius": 0.6}, {"radius": 1.5}, {"plain_l2": True},
    {"layer_reduce": "sum"}, {"layer_reduce": "sum", "faw": False, "in_batch_negatives": False},
    {"layer_reduce": "sum", "plain_l2": True},
])
def test_matches_reference_other_switches(mask, extra):
    _assert_matches(_cfg(mask=mask, **extra))


@pytest.mark.parametrize("mask", ["radial", "teacher_quantile"])
@pytest.mark.parametrize("shape", [(3, 2, 3, 7, 9), (2, 4, 1, 6, 6), (3, 2, 2, 5, 4), (3, 3, 2, 6, 7)])
def test_matches_reference_odd_and_even_sizes(mask, shape):
    _assert_matches(_cfg(mask=mask), shape=shape)


@pytest.mark.parametrize("mask", ["radial", "teacher_quantile"])
def test_matches_reference_bf16_inputs(mask):
    res, *_ = _run(_cfg(mask=mask), dtype=torch.bfloat16)
    assert res.loss.dtype == torch.float32  # computed in fp32
    _assert_matches(_cfg(mask=mask), dtype=torch.bfloat16)


def test_autocast_region_does_not_lower_precision():
    s, t = _inputs(cutoff=0.2)
    plain = framer_objective(s, t, _cfg(), torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = framer_objective(s, t, _cfg(), torch.Generator().manual_seed(0))
    assert auto.loss.dtype == torch.float32
    torch.testing.assert_close(auto.loss, plain.loss)


def test_rfft_shortcut_equals_full_fft():
    for mask in ("radial", "teacher_quantile"):
        s, t = _inputs(3, (3, 2, 2, 9, 12), cutoff=0.2)
        a = framer_objective(s, t, _cfg(mask=mask, use_rfft=True), torch.Generator().manual_seed(1))
        b = framer_objective(s, t, _cfg(mask=mask, use_rfft=False), torch.Generator().manual_seed(1))
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
        for k in CONTRACT_KEYS:
            torch.testing.assert_close(a.metrics[k], b.metrics[k], rtol=1e-5, atol=1e-5)


def test_result_contract():
    s, t = _inputs()
    res = framer_objective(s, t, _cfg(), torch.Generator().manual_seed(0))
    assert isinstance(res, FramerResult)
    assert res.loss.dim() == 0 and res.loss.requires_grad
    for k in CONTRACT_KEYS + ("loss_layer", "nonfinite", "skipped"):
        assert res.metrics[k].shape == (L,), k
        assert not res.metrics[k].requires_grad, k
    assert float(res.metrics["skipped"].sum()) == 0
    # l_intra / l_inter follow the band assignment
    torch.testing.assert_close(res.metrics["l_intra"], res.metrics["l_lf"])
    torch.testing.assert_close(res.metrics["l_inter"], res.metrics["l_hf"])
    # mean vs sum over layers, before lambda
    res_sum = framer_objective(s, t, _cfg(layer_reduce="sum"), torch.Generator().manual_seed(0))
    torch.testing.assert_close(res_sum.loss, res.loss * L)
    torch.testing.assert_close(res.loss, res.metrics["loss_layer"].mean())
    with torch.no_grad():  # the caller's grad mode is respected (metrics-only use)
        assert not framer_objective(s, t, _cfg(), torch.Generator().manual_seed(0)).loss.requires_grad


def test_no_random_negatives_makes_intra_zero_with_warning():
    s, t = _inputs()
    with pytest.warns(UserWarning, match="IntraCL"):
        res = framer_objective(s, t, _cfg(random_negatives=False), None)
    assert torch.all(res.metrics["l_intra"] == 0)
    assert torch.all(res.metrics["l_inter"] > 0)
    assert torch.all(res.negative_layers == -1)


def test_inter_without_in_batch_equals_two_way_intra_formula():
    s, t = _inputs()
    a = framer_objective(s, t, _cfg(hf_loss="inter", in_batch_negatives=False), torch.Generator().manual_seed(2))
    b = framer_objective(s, t, _cfg(hf_loss="intra"), torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.loss, b.loss)
    # and with in-batch negatives the InterCL loss is larger (more negatives in the softmax)
    c = framer_objective(s, t, _cfg(), torch.Generator().manual_seed(2))
    assert torch.all(c.metrics["l_inter"] > a.metrics["l_inter"])


# --------------------------------------------------------------------------------------------
# gradients


def test_gradients_reach_only_students():
    s, t = _inputs()
    t.requires_grad_(True)
    res = framer_objective(s, t, _cfg(), torch.Generator().manual_seed(0))
    res.loss.backward()
    assert t.grad is None  # the teacher is detached
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for k, v in res.metrics.items():  # w, a and the rest carry no graph
        assert v.grad_fn is None and not v.requires_grad, k


def test_negatives_and_modulation_are_detached():
    """With L = 2 the negative of layer 0 is layer 1 and vice versa. If the keys or w/a carried
    gradient, the autograd gradient would include those paths; it equals the reference's, whose
    keys and weights are explicitly ``.detach()``-ed, and differs from an undetached variant."""
    s, t = _inputs(shape=(2, 3, 2, 8, 10))
    cfg = _cfg()
    res = framer_objective(s, t, cfg, torch.Generator().manual_seed(0))
    assert res.negative_layers.tolist() == [1, 0]
    (g,) = torch.autograd.grad(res.loss, s)
    # numerical derivative along the gradient direction includes the key/w/a paths: it differs
    d = g / g.norm()
    eps = 1e-3
    with torch.no_grad():
        lp = framer_objective(s + eps * d, t, cfg, torch.Generator().manual_seed(0)).loss
        lm = framer_objective(s - eps * d, t, cfg, torch.Generator().manual_seed(0)).loss
    fd = (lp - lm) / (2 * eps)
    assert abs(fd.item() - g.norm().item()) > 1e-4 * g.norm().item()


@pytest.mark.parametrize("mask", ["radial", "teacher_quantile"])
def test_finite_difference_matches_autograd(mask):
    """float64 finite differences vs autograd. Stop-gradients (random-layer keys, w, a) are not
    differentiable paths by design, so this runs with them off; every other path (FFT, masks,
    band vectors, norms, global InfoNCE on both bands) is checked."""
    cfg = _cfg(mask=mask, faw=False, fam=False, random_negatives=False, lf_loss="inter", radius=0.6)
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 1, 4, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: framer_objective(x, t, cfg, None).loss, (s,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_finite_difference_plain_l2():
    cfg = _cfg(plain_l2=True)
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 2, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: framer_objective(x, t, cfg, torch.Generator().manual_seed(0)).loss, (s,), fast_mode=True)


def test_half_spectrum_magnitude_backward_matches_autograd_fft():
    for w in (6, 7):
        g = torch.Generator().manual_seed(w)
        xs = torch.randn(2, 2, 2, 5, w, generator=g, dtype=torch.float64, requires_grad=True)
        xt = torch.randn(2, 2, 5, w, generator=g, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda x: spectrum_magnitude(x, xt, True), (xs,), fast_mode=True)
        xs0 = xs.detach().clone()
        xs0[0, 0, 0] = 0.0  # exact zero bins: gradient 0 there, never NaN
        xs0.requires_grad_(True)
        spectrum_magnitude(xs0, xt, True).sum().backward()
        assert torch.isfinite(xs0.grad).all()


# --------------------------------------------------------------------------------------------
# random-layer draw


def test_generator_determinism():
    s, t = _inputs()
    a = framer_objective(s, t, _cfg(), torch.Generator().manual_seed(123))
    b = framer_objective(s, t, _cfg(), torch.Generator().manual_seed(123))
    assert torch.equal(a.negative_layers, b.negative_layers)
    assert torch.equal(a.loss, b.loss)
    # different states give different draws (over a few steps of each generator)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    draws_a = [draw_negative_layers(8, ga).tolist() for _ in range(3)]
    draws_b = [draw_negative_layers(8, gb).tolist() for _ in range(3)]
    assert draws_a != draws_b
    # a restored state replays the draw (resume)
    g = torch.Generator().manual_seed(7)
    draw_negative_layers(8, g)
    state = g.get_state()
    first = draw_negative_layers(8, g)
    g.set_state(state)
    assert torch.equal(draw_negative_layers(8, g), first)


def test_draw_is_uniform_over_other_layers():
    g = torch.Generator().manual_seed(0)
    n, steps = 5, 4000
    counts = torch.zeros(n, n)
    for _ in range(steps):
        j = draw_negative_layers(n, g)
        counts[torch.arange(n), j] += 1
    assert torch.all(counts.diagonal() == 0)
    off = counts[~torch.eye(n, dtype=torch.bool)] / steps
    assert torch.all((off - 1 / (n - 1)).abs() < 0.03)


# --------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("h,w", [(8, 10), (7, 9), (6, 5)])
@pytest.mark.parametrize("radius", [0.0, 0.2, 0.5, 1.0])
def test_radial_mask_properties(h, w, radius):
    full = radial_lf_mask(h, w, radius, False, torch.device("cpu"))
    hf = ~full
    assert torch.all(full.int() + hf.int() == 1)  # LF + HF = 1
    ky, kx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    assert torch.equal(full, full[(-ky) % h, (-kx) % w])  # symmetric under frequency negation
    half = radial_lf_mask(h, w, radius, True, torch.device("cpu"))
    assert torch.equal(half, full[:, : w // 2 + 1])  # the rfft half is the same mask
    assert radial_lf_mask(h, w, radius, False, torch.device("cpu")) is full  # cached


@pytest.mark.parametrize("h,w,radius", [(8, 10, 0.6), (10, 10, 0.6), (20, 20, 0.3), (6, 10, 0.2), (9, 15, 0.4)])
def test_radial_mask_bin_exactly_on_the_radius_is_lf(h, w, radius):
    """Spec: M_LF = 1[rho <= r] with fx = 2 kx / W. A bin whose exact frequency equals r (here
    kx = r W / 2 on the fy = 0 row) is LF. ``fftfreq(n) * 2`` computes k * (1/n) * 2 with two
    roundings (3 * 0.1 * 2 = 0.6000000000000001 > 0.6) and used to drop such bins; the
    frequencies must be the correctly rounded 2k/n, as the reference's."""
    from framer_dist.framer.reference import _radial_lf
    k = round(radius * w / 2)
    assert 2 * k / w == radius  # the bin (0, k) lies exactly on the radius
    for half in (False, True):
        m = radial_lf_mask(h, w, radius, half, torch.device("cpu"))
        assert m[0, k], (half, k)
    full = radial_lf_mask(h, w, radius, False, torch.device("cpu"))
    ref = torch.fft.ifftshift(_radial_lf(h, w, radius, torch.device("cpu")), dim=(-2, -1)).bool()
    assert torch.equal(full, ref)


def test_radial_mask_boundaries():
    dev = torch.device("cpu")
    m0 = radial_lf_mask(8, 10, 0.0, False, dev)
    assert m0.sum() == 1 and m0[0, 0]  # radius 0: exactly the DC bin
    for r in (math.sqrt(2), 2.0):
        assert radial_lf_mask(8, 10, r, False, dev).all()  # all LF, HF empty
    assert not radial_lf_mask(8, 10, math.sqrt(2) - 0.01, False, dev).all()  # corner bin is HF
    # radius = 1 (Nyquist) holds the inscribed disc
    f = normalized_frequencies(8)
    assert f.min() == -1 and f.max() < 1
    # objective at radius >= sqrt(2): HF band empty -> cos_hf = a_hf = 0, HF loss constant, finite
    s, t = _inputs()
    res = framer_objective(s, t, _cfg(radius=1.5), torch.Generator().manual_seed(0))
    assert torch.isfinite(res.loss)
    assert torch.all(res.metrics["cos_hf"] == 0) and torch.all(res.metrics["a_hf"] == 0)
    torch.testing.assert_close(res.metrics["l_hf"], torch.full((L,), math.log(2 * B)))
    res.loss.backward()
    assert torch.isfinite(s.grad).all()


def test_empty_band_with_a_gather_function():
    """radius >= sqrt(2) empties the HF band; the trainer always passes a gather (also on one
    rank), whose key split must cope with zero-width keys and agree with the no-gather result."""
    s, t = _inputs()
    cfg = _cfg(radius=2.0)
    want = framer_objective(s, t, cfg, torch.Generator().manual_seed(0))
    got = framer_objective(s, t, cfg, torch.Generator().manual_seed(0), gather=lambda x: x.clone())
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.metrics["l_hf"], torch.full((L,), math.log(2 * B)))


def test_column_weights_count_mirrors():
    for w in (8, 9):
        count, sqrt_w = column_weights(w, True, torch.device("cpu"))
        assert count.sum() == w  # every full-spectrum column accounted for once
        torch.testing.assert_close(sqrt_w ** 2, count)


def test_teacher_quantile_mask_properties():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 2, 8, 10, generator=g)
    full = torch.fft.fft2(t).abs()
    lf = teacher_quantile_lf_mask(full, 0.2, False, 10)
    q = torch.quantile(full.reshape(3, -1), 0.2, dim=1)
    assert torch.equal(lf, full < q.view(3, 1, 1, 1))
    ky, kx = torch.meshgrid(torch.arange(8), torch.arange(10), indexing="ij")
    assert torch.equal(lf, lf[..., (-ky) % 8, (-kx) % 10])  # symmetric too (|S(k)| = |S(-k)|)
    half = teacher_quantile_lf_mask(torch.fft.rfft2(t).abs(), 0.2, True, 10)
    assert torch.equal(half, lf[..., :6])
    # it selects the weakest bins: every LF magnitude is below every HF magnitude of the sample
    for b in range(3):
        assert full[b][lf[b]].max() < full[b][~lf[b]].min()


def test_teacher_quantile_keeps_mirror_twins_together():
    """Where the plain fft2 mask splits a mirror pair by rounding, ours (half spectrum) keeps the
    pair on one side: its mask is exactly symmetric, the exact-arithmetic answer."""
    found = 0
    for seed in range(40):
        _, t = _raw_inputs(seed, (2, 2, 2, 9, 12), torch.float32)
        if not _twin_split(t):
            continue
        found += 1
        half = teacher_quantile_lf_mask(torch.fft.rfft2(t).abs(), 0.2, True, 12)
        rows = (-torch.arange(9)) % 9
        # interior columns stand for their mirrors (same value by construction); the DC and
        # Nyquist columns hold both (ky, .) and (-ky, .): they must agree
        assert torch.equal(half[..., 0], half[..., rows, 0])
        assert torch.equal(half[..., 6], half[..., rows, 6])
    assert found > 0  # the situation is common, not hypothetical


# --------------------------------------------------------------------------------------------
# layer selection


def test_select_layers():
    assert select_layers(6, FramerConfig()) == ([0, 1, 2, 3, 4], 5)
    assert select_layers(6, FramerConfig(students="all")) == ([0, 1, 2, 3, 4, 5], 5)
    assert select_layers(6, FramerConfig(teacher_layer=3)) == ([0, 1, 2, 4], 3)
    assert select_layers(6, FramerConfig(students=[0, 2, -2])) == ([0, 2, 4], 5)
    with pytest.raises(ValueError, match="teacher_layer"):
        select_layers(6, FramerConfig(teacher_layer=6))
    with pytest.raises(ValueError, match="out of range"):
        select_layers(6, FramerConfig(students=[0, 9]))
    with pytest.raises(ValueError, match="twice"):
        select_layers(6, FramerConfig(students=[1, 1]))


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_shapes_raise_clear_errors():
    s, t = _inputs()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"disagree"):
        framer_objective(s, t[:, :, :4], _cfg(), gen)
    with pytest.raises(ValueError, match=r"teacher must be a 4-D"):
        framer_objective(s, t[0], _cfg(), gen)
    with pytest.raises(ValueError, match=r"students must be a \[L, B, C, H, W\]"):
        framer_objective(s[0], t, _cfg(), gen)
    with pytest.raises(ValueError, match=r"at least two student layers"):
        framer_objective(s[:1], t, _cfg(), gen)
    framer_objective(s[:1], t, _cfg(random_negatives=False, lf_loss="inter"), None)  # fine without
    with pytest.raises(ValueError, match=r"global batch of at least 2"):
        framer_objective(s[:, :1], t[:1], _cfg(), gen)
    framer_objective(s[:, :1], t[:1], _cfg(in_batch_negatives=False), gen)  # fine without
    with pytest.raises(ValueError, match=r"torch.Generator"):
        framer_objective(s, t, _cfg(), None)
    with pytest.raises(ValueError, match=r"floating point"):
        framer_objective(s, t.long(), _cfg(), gen)
    with pytest.raises(ValueError, match=r"rank=1 but no gather"):
        framer_objective(s, t, _cfg(), gen, rank=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_features_error_names_the_layer(bad):
    s, t = _inputs()
    s = s.detach().clone()
    s[2, 1, 0, 3, 3] = bad
    with pytest.raises(FloatingPointError, match=r"student layer 2"):
        framer_objective(s, t, _cfg(), torch.Generator().manual_seed(0))
    t2 = t.clone()
    t2[0, 0, 0, 0] = bad
    with pytest.raises(FloatingPointError, match=r"the teacher"):
        framer_objective(s.nan_to_num(0.0, 0.0, 0.0), t2, _cfg(), torch.Generator().manual_seed(0))


def test_deferred_nonfinite_check_raises_in_verify_and_changes_nothing_else():
    s, t = _inputs()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = framer_objective(s, t, _cfg(), gen())
    res = framer_objective(s, t, _cfg(), gen(), defer_check=True)
    assert torch.equal(res.loss, ref.loss)
    for k in ref.metrics:
        assert torch.equal(res.metrics[k], ref.metrics[k]), k
    res.verify()  # finite: no error
    bad = s.detach().clone()
    bad[2, 1, 0, 3, 3] = float("nan")
    res = framer_objective(bad, t, _cfg(), gen(), defer_check=True)  # no host sync, no raise yet
    assert res.metrics["nonfinite"].tolist() == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(FloatingPointError, match=r"student layer 2"):
        res.verify()
    # 'skip' needs the decision before the loss is built: never deferred
    res = framer_objective(bad, t, _cfg(nonfinite="skip"), gen(), defer_check=True)
    assert res.pending_finite is None and res.loss.item() == 0.0


def test_nonfinite_skip_returns_zero_and_flags():
    s, t = _inputs()
    s = s.detach().clone()
    s[1, 0, 0, 0, 0] = float("nan")
    s.requires_grad_(True)
    res = framer_objective(s, t, _cfg(nonfinite="skip"), torch.Generator().manual_seed(0))
    assert res.loss.item() == 0.0 and not torch.isnan(res.loss)
    assert res.metrics["skipped"].tolist() == [1.0] * L
    assert res.metrics["nonfinite"].tolist() == [0.0, 1.0, 0.0, 0.0]
    for k in CONTRACT_KEYS:
        assert torch.isfinite(res.metrics[k]).all()


def test_fp32_overflow_is_reported_not_silent():
    s, t = _inputs()
    s = s.detach().clone()
    s[0] = 3e38  # finite in fp32, but the FFT sum overflows
    with pytest.raises(FloatingPointError, match=r"student layer 0"):
        framer_objective(s, t, _cfg(), torch.Generator().manual_seed(0))


def test_config_defaults_are_the_spec_defaults():
    """docs/specs/framer.md sections 1-5: every default it states, in one place."""
    c = FramerConfig()
    assert (c.enabled, c.feature, c.students, c.teacher_layer) == (True, "x0", "all_but_last", -1)
    assert (c.mask, c.radius, c.cutoff, c.tau) == ("radial", 0.2, 0.2, 1.0)
    assert (c.faw, c.fam, c.faw_denominator) == (True, True, "student")
    assert (c.random_negatives, c.in_batch_negatives, c.lf_loss, c.hf_loss) == (True, True, "intra", "inter")
    assert (c.plain_l2, c.weight, c.layer_reduce) == (False, 0.1, "mean")


def test_config_dataclass_fields_all_used():
    """Every framer switch of the config is read by the objective or select_layers (guards against a
    switch that silently does nothing)."""
    import inspect

    import framer_dist.framer.layers as layers_mod
    import framer_dist.framer.objective as obj_mod
    src = inspect.getsource(obj_mod) + inspect.getsource(layers_mod)
    trainer_owned = {"enabled", "feature", "weight"}  # read by the trainer, not the objective
    for f in dataclasses.fields(FramerConfig):
        if f.name not in trainer_owned:
            assert f"cfg.{f.name}" in src, f.name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mask", ["radial", "teacher_quantile"])
def test_cuda_matches_cpu(mask):
    s, t = _inputs(cutoff=0.2)
    cfg = _cfg(mask=mask)
    cpu = framer_objective(s, t, cfg, torch.Generator().manual_seed(0))
    (g_cpu,) = torch.autograd.grad(cpu.loss, s)
    sc = s.detach().cuda().requires_grad_(True)
    gpu = framer_objective(sc, t.cuda(), cfg, torch.Generator().manual_seed(0))
    (g_gpu,) = torch.autograd.grad(gpu.loss, sc)
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-4, atol=1e-6)
    for k in CONTRACT_KEYS:
        torch.testing.assert_close(gpu.metrics[k].cpu(), cpu.metrics[k], rtol=1e-5, atol=1e-5)


def test_hf_layers_drop_only_those_students_hf_terms():
    """hf_layers (FRAMER_U's coarse students): a masked student keeps its LF term, loses its HF
    term; the other students' terms are unchanged (it still serves as their negative)."""
    cfg = _cfg(faw=False, fam=False)  # weights and gates 1: loss_layer = l_lf + l_hf
    s, t = _inputs()
    full = framer_objective(s, t, cfg, torch.Generator().manual_seed(0))
    mask = torch.ones(L, dtype=torch.bool)
    mask[0] = False
    part = framer_objective(s, t, cfg, torch.Generator().manual_seed(0), hf_layers=mask)
    m_full, m_part = full.metrics, part.metrics
    torch.testing.assert_close(m_full["loss_layer"], m_full["l_lf"] + m_full["l_hf"])
    torch.testing.assert_close(m_part["loss_layer"][0], m_part["l_lf"][0])
    torch.testing.assert_close(m_part["loss_layer"][1:], m_full["loss_layer"][1:])
    assert m_part["a_hf"][0] == 0 and m_full["l_hf"][0] > 0
    part.loss.backward()
    assert s.grad[0].abs().sum() > 0  # the LF term still trains it
    with pytest.raises(ValueError, match=r"hf_layers must be \[L=4\]"):
        framer_objective(s, t, cfg, torch.Generator().manual_seed(0), hf_layers=mask[:2])
