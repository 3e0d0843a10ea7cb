"""The degradation on CUDA: graphed == eager, batch invariance, fresh draws per call (skipped
without a GPU)."""

from __future__ import annotations

import pytest
import torch

from framer_dist.data.degrade import DegradeParams, _degrade, _full_fp32, degrade
from framer_dist.data.degrade_graph import GraphedDegrader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _hr(b: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth random images: blur and resize change them visibly
    x = torch.rand(b, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.clamp(0, 1).cuda()


def _eager(hr: torch.Tensor, seeds: list[int]) -> dict[str, torch.Tensor]:
    with _full_fp32():
        return _degrade(hr, seeds, static_canvas=True)


def test_graphed_equals_eager_bitwise():
    hr = _hr(8)
    g = GraphedDegrader()
    for seeds in (list(range(8)), list(range(100, 108))):       # capture, then a replay
        out = g(hr, seeds)
        ref = _eager(hr, seeds)
        for k in ref:
            assert torch.equal(out[k], ref[k]), k
    assert len(g) == 1


def test_degrade_defaults_to_the_graph_and_equals_eager():
    hr = _hr(4)
    a = degrade(hr, [1, 2, 3, 4])
    b = degrade(hr, [1, 2, 3, 4], graph=False)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_batch_invariance_on_cuda():
    """A sample degraded in two different batches of the same size gives the same bits."""
    hr_a, hr_b = _hr(6, seed=1), _hr(6, seed=2)
    hr_b[4] = hr_a[1]
    seeds_a = [10, 11, 12, 13, 14, 15]
    seeds_b = [20, 21, 22, 23, 11, 25]
    g = GraphedDegrader()
    for run in (g, _eager):
        a, b = run(hr_a, seeds_a), run(hr_b, seeds_b)
        for k in a:
            assert torch.equal(a[k][1], b[k][4]), k


def test_repeated_graphed_calls_draw_fresh_and_repeat():
    hr = _hr(4)
    g = GraphedDegrader()
    first = g(hr, [1, 2, 3, 4])
    keep = {k: v.clone() for k, v in first.items()}
    other = g(hr, [5, 6, 7, 8])
    again = g(hr, [1, 2, 3, 4])
    for k in first:
        assert torch.equal(first[k], keep[k]), k            # outputs are not the graph's buffers
        assert torch.equal(again[k], keep[k]), k
    for i in range(4):
        assert not torch.equal(other["lr"][i], keep["lr"][i]), i


def test_cuda_close_to_cpu():
    """Same draws and noise bits on both devices; only float rounding may differ."""
    hr = _hr(4)
    seeds = [3, 4, 5, 6]
    gpu = degrade(hr, seeds)
    cpu = degrade(hr.cpu(), seeds, batched=True)
    for k in gpu:
        diff = (gpu[k].cpu() - cpu[k]).abs()
        assert float(diff.mean()) < 2 / 255, (k, float(diff.mean()))


def test_run_plan_on_cuda_does_no_host_reads_or_transfers():
    from _host_traffic import HostTrafficRecorder

    from framer_dist.data.degrade import plan_degradation, prepare_device, run_plan

    hr = _hr(4)
    p = DegradeParams()
    plan = plan_degradation([1, 2, 3, 4], p, (64, 64), static_canvas=True).to(hr.device)
    prepare_device(hr.device, p, (64, 64))
    rec = HostTrafficRecorder()
    with _full_fp32(), rec:
        run_plan(hr, plan)
    assert rec.bad == []


def test_graph_cache_keeps_the_most_recent_sizes_only():
    g = GraphedDegrader(max_graphs=2)
    for b in (4, 5, 4, 6):                  # 5 is the least recently used when 6 arrives
        out = g(_hr(b), list(range(b)))
        assert out["lr"].shape[0] == b
    assert len(g) == 2 and {k[0] for k in g._graphs} == {4, 6}
