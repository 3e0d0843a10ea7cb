"""Two processes over gloo with a real ``dist.all_gather``, each holding half the batch, give the
FRAMER loss and student gradients of one process holding the whole batch; and the cross-rank
checks (unequal batches, out-of-sync generators, NaN on one rank) act on every rank alike.

One spawn runs every scenario (process start is the expensive part on shared CPUs).
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from framer_dist.config import FramerConfig
from framer_dist.framer import framer_objective

WORLD, B_LOCAL, SHAPE = 2, 3, (4, 2, 8, 10)  # (L, C, H, W); per rank B_LOCAL images
CONFIGS = {
    "radial": FramerConfig(radius=0.5),
    "quantile": FramerConfig(mask="teacher_quantile"),
    "both_inter_sum": FramerConfig(radius=0.5, lf_loss="inter", layer_reduce="sum", faw_denominator="teacher"),
    # the gather without random-layer keys, and the switch that needs no gather at all
    "no_random_negatives": FramerConfig(radius=0.5, random_negatives=False),
    "no_in_batch_tau": FramerConfig(radius=0.5, in_batch_negatives=False, tau=0.3),
}


def _global_inputs():
    n_layers, c, h, w = SHAPE
    g = torch.Generator().manual_seed(11)
    students = torch.randn(n_layers, WORLD * B_LOCAL, c, h, w, generator=g)
    teacher = 0.6 * students[-1] + 0.4 * torch.randn(WORLD * B_LOCAL, c, h, w, generator=g)
    return students, teacher


def _gather(t: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results: dict = {}
    try:
        students, teacher = _global_inputs()
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for name, cfg in CONFIGS.items():
            s = students[:, sl].clone().requires_grad_(True)
            res = framer_objective(s, teacher[sl], cfg, torch.Generator().manual_seed(5), gather=_gather, rank=rank)
            res.loss.backward()
            results[name] = (res.loss.detach(), s.grad, {k: v for k, v in res.metrics.items()})

        def expect_error(fn):
            try:
                fn()
            except (ValueError, FloatingPointError) as e:
                return f"{type(e).__name__}: {e}"
            return "no error"

        # unequal local batches: rank 1 holds one image fewer
        b = B_LOCAL - rank
        results["unequal"] = expect_error(lambda: framer_objective(
            students[:, :b], teacher[:b], CONFIGS["radial"], torch.Generator().manual_seed(5), _gather, rank))
        # generators out of sync
        results["desync"] = expect_error(lambda: framer_objective(
            students[:, sl], teacher[sl], CONFIGS["radial"], torch.Generator().manual_seed(5 + rank), _gather, rank))
        # NaN on rank 1 only: every rank raises (error) or skips (skip), nobody hangs
        s_bad = students[:, sl].clone()
        if rank == 1:
            s_bad[2, 0, 0, 0, 0] = float("nan")
        results["nan_error"] = expect_error(lambda: framer_objective(
            s_bad, teacher[sl], CONFIGS["radial"], torch.Generator().manual_seed(5), _gather, rank))
        skip_cfg = FramerConfig(radius=0.5, nonfinite="skip")
        res = framer_objective(s_bad, teacher[sl], skip_cfg, torch.Generator().manual_seed(5), _gather, rank)
        results["nan_skip"] = (float(res.loss), res.metrics["skipped"].tolist(), res.metrics["nonfinite"].tolist())
        # the process group still works afterwards (no rank left behind in a collective)
        t = torch.ones(1) * (rank + 1)
        dist.all_reduce(t)
        results["after"] = float(t)
    except Exception:  # report to the parent instead of dying silently
        results["crash"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("framer_dist")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    out = [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "crash" not in res, f"rank {r} crashed:\n{res.get('crash')}"
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_one_process(two_rank_results, name):
    students, teacher = _global_inputs()
    s = students.clone().requires_grad_(True)
    full = framer_objective(s, teacher, CONFIGS[name], torch.Generator().manual_seed(5))
    full.loss.backward()
    losses = [r[name][0] for r in two_rank_results]
    grads = [r[name][1] for r in two_rank_results]
    # each rank averages over its own images (L^(i) is a batch mean, for both layer reductions):
    # the mean of the rank losses is the full loss
    torch.testing.assert_close(torch.stack(losses).mean(), full.loss.detach(), rtol=1e-5, atol=1e-6)
    # keys are detached, so d(full)/d(own features) = (1 / world) d(rank loss)/d(own features):
    # exactly what data-parallel gradient averaging produces
    for r in range(WORLD):
        sl = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        torch.testing.assert_close(grads[r] / WORLD, s.grad[:, sl], rtol=1e-5, atol=1e-7)
    # per-layer metrics: the average of the rank batch-means is the full batch-mean
    for k in ("w_lf", "w_hf", "a_lf", "a_hf", "cos_lf", "cos_hf", "l_intra", "l_inter"):
        avg = torch.stack([r[name][2][k] for r in two_rank_results]).mean(0)
        torch.testing.assert_close(avg, full.metrics[k], rtol=1e-5, atol=1e-6)


def test_two_ranks_refuse_unequal_batches(two_rank_results):
    for r in two_rank_results:
        assert "unequal local batch sizes across data-parallel ranks [3, 2]" in r["unequal"], r["unequal"]
        assert "drop_last" in r["unequal"]


def test_two_ranks_refuse_out_of_sync_generators(two_rank_results):
    for r in two_rank_results:
        assert "random-layer draw differs across ranks" in r["desync"], r["desync"]


def test_two_ranks_agree_on_nonfinite(two_rank_results):
    for r in two_rank_results:
        assert r["nan_error"].startswith("FloatingPointError"), r["nan_error"]
        assert "student layer 2" in r["nan_error"] and "rank 1" in r["nan_error"]
        loss, skipped, nonfinite = r["nan_skip"]
        assert loss == 0.0 and skipped == [1.0] * SHAPE[0]
        assert r["after"] == 3.0
    assert two_rank_results[0]["nan_skip"][2] == [0.0] * SHAPE[0]  # rank 0's own layers were fine
    assert two_rank_results[1]["nan_skip"][2] == [0.0, 0.0, 1.0, 0.0]
