"""Real 2-rank (gloo) runs of the DeepSpeed ZeRO-3 and FSDP2 backends on a tiny model with
activation checkpointing: parity with one process, exact resume after kill -9, elastic 2->1->2,
preemption, 8-bit optimizer checkpoints. Phases are grouped so each backend costs 3 launches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parallel_launch import free_port, launch, tail  # noqa: E402
from _waiting import HANG_S  # noqa: E402

pytestmark = pytest.mark.distributed

STEPS = 6
REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("zero2", "zero3", "zero3_offload")


def _launches(backend: str, out: Path) -> dict:
    fp32 = {"backend": backend, "ema": True}  # EMA on: it must survive every resume too
    l1 = [
        {**fp32, "name": "A", "steps": STEPS, "ckpt": "ckA", "every": 3},
        {**fp32, "name": "Q1", "optimizer": "adamw8bit", "steps": 6, "ckpt": "ckQ", "every": 2},
        {**fp32, "name": "Q2", "optimizer": "adamw8bit", "steps": 6, "ckpt": "ckQ2",
         "resume": "ckQ/step_00000002"},
        {**fp32, "name": "BF", "precision": "bf16", "steps": 3, "ckpt": "ckBF"},
        {**fp32, "name": "QB", "optimizer": "adamw8bit", "precision": "bf16", "steps": 3,
         "ckpt": "ckQB", "every": 3},
    ]
    if backend == "deepspeed":
        l1[0]["count_fetches"] = True
        # the same run with every block one ZeRO-3 fetch unit (DeepSpeed's leaf_module setting,
        # which the JSON leaves to the backend: the model's block classes); the other phases name
        # no leaves. Control mode: block 0's inputs come from the frozen embedding, need no grad
        l1.insert(1, {**fp32, "name": "LF", "steps": STEPS, "ckpt": "ckLF", "every": 3,
                      "leaf": None, "count_fetches": True})
        l1.append({**fp32, "name": "Z2", "stage": 2, "steps": 3, "ckpt": "ckZ2", "every": 2})
        for cfg_name in SHIPPED:  # the shipped JSONs as they are, in bf16
            l1.append({**fp32, "name": f"ship_{cfg_name}", "precision": "bf16", "steps": 2,
                       "ckpt": f"ck_{cfg_name}", "ds_config": str(REPO / "ds_configs" / f"{cfg_name}.json")})
    l1.append({**fp32, "name": "B1", "steps": STEPS, "ckpt": "ckB", "every": 2, "kill_at_save": 4})
    l2 = [
        {**fp32, "name": "C", "steps": STEPS, "ckpt": "ckC", "every": 2, "resume": "ckA/step_00000003"},
        {**fp32, "name": "Q3", "optimizer": "adamw8bit", "steps": 6, "ckpt": "ckQ3",
         "resume": "ckQ/step_00000004"},
        # from step 2, where the schedule's LR (1.0 x lr) differs from its first one (0.5 x lr)
        {**fp32, "name": "Q4", "optimizer": "adamw8bit", "steps": 6, "ckpt": "ckQ4",
         "resume": "ckQ/step_00000002"},
    ]
    # bf16 8-bit on another world size (DeepSpeed: the weights-only path): only loads
    l2.append({**fp32, "name": "QB2", "optimizer": "adamw8bit", "precision": "bf16", "steps": 3,
               "ckpt": "ckQB2", "resume": "ckQB/step_00000003"})
    if backend == "deepspeed":  # ZeRO-2 universal conversion 2 -> 1
        l2.append({**fp32, "name": "Z2C", "stage": 2, "steps": 3, "ckpt": "ckZ2C",
                   "resume": "ckZ2/step_00000002"})
    l3 = [
        {**fp32, "name": "B2", "steps": STEPS, "ckpt": "ckB", "resume": "auto", "every": 2},
        {**fp32, "name": "E", "steps": STEPS, "ckpt": "ckE", "resume": "ckC/step_00000004"},
        {**fp32, "name": "P", "steps": 4, "ckpt": "ckP", "preempt_at": 1, "preempt_rank": 1,
         "signal": "SIGUSR2"},
    ]
    rc1 = launch(2, out, l1)
    log1 = tail(out)
    rc2 = launch(1, out, l2)
    rc3 = launch(2, out, l3)
    return {"rc": (rc1, rc2, rc3), "log1": log1, "log": tail(out)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same recipe in this process with the `none` backend (and its own exact resume)."""
    import _parallel_worker as w

    out = tmp_path_factory.mktemp("single")
    w.run_phase(out, {"name": "S", "backend": "none", "steps": STEPS, "ckpt": "ckS", "every": 3,
                      "ema": True})
    w.run_phase(out, {"name": "S2", "backend": "none", "steps": STEPS, "ckpt": "ckS2",
                      "resume": "ckS/step_00000003", "ema": True})
    return out


@pytest.fixture(scope="module", params=["deepspeed", "fsdp2"])
def dist_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    res = _launches(request.param, out)
    res.update(out=out, backend=request.param)
    return res


def _losses(d: Path) -> dict[int, float]:
    f = d / "losses.json"
    assert f.is_file(), f"{f} missing"
    return {int(k): v for k, v in json.loads(f.read_text()).items()}


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return torch.load(d / "weights.pt", weights_only=True)


def _ema(d: Path) -> dict[str, torch.Tensor]:
    return torch.load(d / "ema.pt", weights_only=True)


def _info(d: Path) -> dict:
    return json.loads((d / "info.json").read_text())


def _close(a: dict, b: dict, atol: float, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ {set(a) ^ set(b)}"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            err = (a[k] - b[k]).abs().max().item()
        else:
            err = abs(a[k] - b[k])
        assert err <= atol, f"{what}: {k} differs by {err} (atol {atol})"


def test_single_process_resume_is_exact(reference):
    s, s2 = reference / "S", reference / "S2"
    _close({k: v for k, v in _losses(s).items() if k >= 3}, _losses(s2), 0.0, "none resume losses")
    _close(_weights(s), _weights(s2), 0.0, "none resume weights")
    _close(_ema(s), _ema(s2), 0.0, "none resume EMA")


def test_parity_with_single_process(dist_run, reference):
    out = dist_run["out"]
    la = _losses(out / "A")
    assert len(la) == STEPS, dist_run["log1"]
    _close(la, _losses(reference / "S"), 1e-5, f"{dist_run['backend']} vs single losses")
    _close(_weights(out / "A"), _weights(reference / "S"), 1e-5, "weights vs single")
    _close(_ema(out / "A"), _ema(reference / "S"), 1e-5, "EMA vs single")
    assert _info(out / "A")["grad_accum"] == 2  # global batch 4 = micro 1 x 2 ranks x 2


def test_zero3_leaf_blocks_fetch_less_and_match(dist_run, reference):
    """Blocks as ZeRO-3 leaves (one fetch per block instead of one per Linear/LayerNorm), with
    activation checkpointing and a first block whose inputs need no grad: same training as the
    fine-grained run and the single process; fewer fetch requests per step."""
    if dist_run["backend"] != "deepspeed":
        pytest.skip("ZeRO-3 only")
    out = dist_run["out"]
    lf, a = out / "LF", out / "A"
    assert (lf / "losses.json").is_file(), dist_run["log1"]
    assert _info(lf)["zero3_leaves"] == [f"transformer_blocks.{i}" for i in range(3)]
    assert _info(a)["zero3_leaves"] == []
    _close(_losses(lf), _losses(a), 1e-6, "leaf vs fine-grained losses")
    _close(_weights(lf), _weights(a), 1e-6, "leaf vs fine-grained weights")
    _close(_losses(lf), _losses(reference / "S"), 1e-5, "leaf vs single losses")
    _close(_weights(lf), _weights(reference / "S"), 1e-5, "leaf vs single weights")
    _close(_ema(lf), _ema(reference / "S"), 1e-5, "leaf vs single EMA")
    fine, leaf = _info(a)["fetches"][-1], _info(lf)["fetches"][-1]  # a steady step (trace recorded)
    # per micro-step: fine = root, embed, head + 3 blocks x (block, 3 children) in forward and
    # the same again in backward; leaf = root, embed, head + 3 blocks
    assert leaf["hook_fetches"] < fine["hook_fetches"] / 2, (leaf, fine)


def test_zero2_parity_and_elastic(dist_run, reference):
    if dist_run["backend"] != "deepspeed":
        pytest.skip("ZeRO-2 is a DeepSpeed stage")
    out = dist_run["out"]
    ref = _losses(reference / "S")
    _close(_losses(out / "Z2"), {k: ref[k] for k in range(3)}, 1e-5, "ZeRO-2 losses")
    assert _info(out / "Z2C")["resumed_from"] == "step_00000002"
    _close(_losses(out / "Z2C"), {2: ref[2]}, 1e-5, "ZeRO-2 2->1 loss")
    _close(_weights(out / "Z2C"), _weights(out / "Z2"), 1e-5, "ZeRO-2 2->1 weights")
    _close(_ema(out / "Z2C"), _ema(out / "Z2"), 1e-5, "ZeRO-2 2->1 EMA")


def test_shipped_ds_configs_train_in_bf16(dist_run):
    if dist_run["backend"] != "deepspeed":
        pytest.skip("DeepSpeed configs")
    ref = _losses(dist_run["out"] / "BF")
    for name in SHIPPED:
        # same recipe as the bf16 ZeRO-3 test run: same losses up to bf16 reduction order
        _close(_losses(dist_run["out"] / f"ship_{name}"), {0: ref[0], 1: ref[1]}, 2e-2, name)


def test_bf16_trains(dist_run):
    d = dist_run["out"] / "BF"
    losses = _losses(d)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    ema, w = _ema(d), _weights(d)
    assert set(ema) == set(w) and all(torch.isfinite(v).all() for v in ema.values())
    assert all(ema[k].shape == w[k].shape for k in w)
    assert any((ema[k] - w[k]).abs().max() > 0 for k in w)  # an average, not a copy


def test_kill_during_save_keeps_previous_and_auto_resume_is_exact(dist_run):
    out = dist_run["out"]
    rc1 = dist_run["rc"][0]
    assert rc1[0] == -9, f"rank 0 should have been SIGKILLed mid-save, got {rc1}\n{dist_run['log1']}"
    ck = out / "ckB"
    # B2 resumed from the newest VALID checkpoint (step 2), not the half-written step 4
    info = _info(out / "B2")
    assert info["resumed_from"] == "step_00000002" and info["rng_exact"] and info["samples"] == 8
    ref = _losses(out / "A")
    _close(_losses(out / "B2"), {k: ref[k] for k in range(2, STEPS)}, 0.0, "resumed losses")
    _close(_weights(out / "B2"), _weights(out / "A"), 0.0, "resumed weights")
    _close(_ema(out / "B2"), _ema(out / "A"), 0.0, "resumed EMA")
    assert (ck / "latest").read_text().strip() == "step_00000006"  # B2's later saves
    assert not list(ck.glob(".tmp-*")), "dead temporary dirs are swept by the next save"


def test_elastic_2_to_1_to_2(dist_run):
    out = dist_run["out"]
    assert dist_run["rc"][1] == [0], dist_run["log"]
    ref_l, ref_w = _losses(out / "A"), _weights(out / "A")
    c = _info(out / "C")
    assert c["world"] == 1 and c["grad_accum"] == 4 and c["resumed_from"] == "step_00000003"
    assert not c["rng_exact"]  # reseeded from (seed, step, rank) on a new world size
    _close(_losses(out / "C"), {k: ref_l[k] for k in range(3, STEPS)}, 1e-5, "2->1 losses")
    _close(_weights(out / "C"), ref_w, 1e-5, "2->1 weights")
    _close(_ema(out / "C"), _ema(out / "A"), 1e-5, "2->1 EMA")
    e = _info(out / "E")
    assert e["world"] == 2 and e["resumed_from"] == "step_00000004"
    _close(_losses(out / "E"), {k: ref_l[k] for k in range(4, STEPS)}, 1e-5, "1->2 losses")
    _close(_weights(out / "E"), ref_w, 1e-5, "1->2 weights")
    _close(_ema(out / "E"), _ema(out / "A"), 1e-5, "1->2 EMA")


def test_bf16_8bit_resume_on_new_world_keeps_fp32_masters(dist_run):
    """bf16 + 8-bit AdamW, saved on 2 ranks, loaded on 1: the trained fp32 masters come back
    exactly (DeepSpeed's weights-only path once rebuilt them from the bf16 module weights)."""
    out = dist_run["out"]
    assert (out / "QB2" / "loaded.pt").is_file(), dist_run["log"]
    _close(torch.load(out / "QB2" / "loaded.pt", weights_only=True), _weights(out / "QB"), 0.0,
           "fp32 masters after the resume")


def _lrs(d: Path) -> dict[int, float]:
    return {int(k): v for k, v in _info(d)["lrs"].items()}


def test_resume_continues_the_lr_schedule(dist_run, reference):
    """Every resume (same world size, elastic, 8-bit weights-only) uses, from its first step on,
    the LR the uninterrupted run used at that step."""
    out = dist_run["out"]
    pairs = [("C", "A"), ("E", "A"), ("B2", "A"), ("Q2", "Q1"), ("Q3", "Q1"), ("Q4", "Q1")]
    if dist_run["backend"] == "deepspeed":
        pairs.append(("Z2C", "Z2"))
    for resumed, ref in pairs:
        want = _lrs(out / ref)
        got = _lrs(out / resumed)
        _close(got, {k: want[k] for k in got}, 1e-12, f"{resumed} vs {ref} LR")
    s, s2 = _lrs(reference / "S"), _lrs(reference / "S2")
    _close(s2, {k: s[k] for k in s2}, 1e-12, "none resume LR")
    _close(_lrs(out / "A"), s, 1e-12, "LR vs single")


def test_global_grad_norm_matches_single_process(dist_run, reference):
    """The pre-clip norm over all shards equals the single process's, and clipping was active
    (train.grad_clip=1), so the weight parity above covers the clipped update."""
    out = dist_run["out"]
    norms = {int(k): v for k, v in _info(reference / "S")["norms"].items()}
    assert min(norms.values()) > 1.0, norms
    _close({int(k): v for k, v in _info(out / "A")["norms"].items()}, norms, 1e-4, "grad norm")


def test_preemption_signal_to_one_rank(dist_run):
    out = dist_run["out"]
    assert dist_run["rc"][2] == [75, 75], dist_run["log"]
    ck = out / "ckP"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002"]
    assert (ck / "step_00000002" / "COMPLETE").is_file()
    assert _info(out / "P")["preempted_at"] == 2


def test_8bit_checkpoint_resume(dist_run):
    out = dist_run["out"]
    q1 = _losses(out / "Q1")
    assert len(q1) == 6
    # same world size: the 8-bit state round-trips exactly, so the continuation is identical
    _close(_losses(out / "Q2"), {k: q1[k] for k in range(2, 6)}, 0.0, "8-bit resumed losses")
    _close(_weights(out / "Q2"), _weights(out / "Q1"), 0.0, "8-bit resumed weights")
    # the 8-bit state really is 8-bit, and differs from fp32 AdamW
    assert abs(q1[3] - _losses(out / "A")[3]) > 1e-6
    # world-size change 2 -> 1 from the step-4 checkpoint
    q3 = _info(out / "Q3")
    q1_at4 = torch.load(out / "Q3" / "loaded.pt", weights_only=True)
    l3 = _losses(out / "Q3")
    assert abs(l3[4] - q1[4]) < 1e-5  # the weights came back (loss at 4 precedes any update)
    warned = [w for w in q3["warnings"] if "ONLY THE WEIGHTS" in w]
    # the loss at step 5 shows whether the moments survived the step-4 update
    drift = abs(l3[5] - q1[5])
    if dist_run["backend"] == "deepspeed":
        assert warned, f"the weights-only resume must warn loudly: {q3['warnings']}"
        assert drift > 1e-3, drift  # moments restarted: a visibly different update
    else:
        assert not warned  # DCP reshards the dequantised moments
        assert drift < 1e-3, drift  # only re-quantisation noise
    assert all(torch.isfinite(v).all() for v in q1_at4.values())


_SKIP_SCRIPT = r"""
import importlib, json, os, sys
sys.path.insert(0, sys.argv[1])
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no 60 s JIT (PLATFORM.md)
import torch
from _tiny_parallel import batch, make_model
from framer_dist.config import load_config
from framer_dist.parallel import setup_backend
cfg = load_config(None, ["parallel.backend='deepspeed'", "parallel.ds_config='ds_configs/zero3.json'",
                         "train.precision='bf16'", "train.device='cpu'", "data.batch_size=4",
                         "train.global_batch_size=4", "train.lr=0.01", "train.ema=true",
                         "train.lr_schedule='warmup_cosine'", "train.warmup_steps=4", "train.steps=8"])
m, params = make_model()
be = setup_backend(cfg, m, params)
rows = []
for step in range(3):
    (x, y), = batch(step, 0, 1, 4)
    with be.autocast():
        loss = ((be.model(x).float() - y) ** 2).mean()
    be.backward(loss * float("nan") if step == 1 else loss)
    norm = be.step()
    rows.append({"norm": norm, "optimizer_step": be.optimizer_step, "lr": be.lr,
                 "weights": [float(v) for v in be.full_trainable_state_dict()["transformer_blocks.0.control.weight"].flatten()[:8]],
                 "ema": [float(v) for v in be.ema_state_dict()["transformer_blocks.0.control.weight"].flatten()[:8]]})
print("ROWS " + json.dumps(rows))
"""


def test_deepspeed_skipped_step_moves_neither_the_step_count_nor_the_ema(tmp_path):
    """DeepSpeed drops an update whose gradients are not finite (ZeRO-3, bf16): the weights and its
    LR schedule stay, and so must our optimizer-step count and the EMA (one rank, own process)."""
    import os
    import subprocess

    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _SKIP_SCRIPT, str(REPO / "tests")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.split("ROWS ", 1)[1])
    before, skipped, after = rows
    assert skipped["norm"] != skipped["norm"] or skipped["norm"] == float("inf")   # nan or inf
    assert skipped["weights"] == before["weights"] and skipped["lr"] == before["lr"]  # DeepSpeed's skip
    assert (before["optimizer_step"], skipped["optimizer_step"], after["optimizer_step"]) == (1, 1, 2)
    assert skipped["ema"] == before["ema"] and after["weights"] != before["weights"]
    assert "DeepSpeed skipped an optimizer step" in proc.stdout
