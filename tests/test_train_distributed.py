"""The REAL trainer (framer_dist/train.py) with the REAL tiny DiT4SR model and FRAMER on 2 ranks over
gloo, on DeepSpeed ZeRO-3 and on FSDP2, activation checkpointing on every block, fp32.

One chain of launches per backend (each launch = one run of train.py, as a launcher starts it):

    K   2 ranks, 6 steps, a checkpoint every step; kill -9 of every rank as soon as a save from
        step 3 on is being written                  -> the killed save is ignored
    K2  2 ranks, --resume auto                      -> exact continuation (same losses as K);
        then SIGUSR1 to rank 1 only                 -> one collective checkpoint, exit 75 everywhere
    C   1 rank, resumes K2's preemption checkpoint  -> elastic 2 -> 1, to the end
    E   2 ranks, resumes C's first checkpoint       -> elastic 1 -> 2, to the end

and one single-process run S (backend none) as the reference: every loss of every launch and the
exported weights must match S to 1e-5 (same global batch of 4: micro 1 x 2 ranks x 2 accumulation
steps, or micro 2 x 2 on one process; per-sample noise and data depend on the global position).
The generic backend mechanics (8-bit states, ZeRO-2, EMA) are tested on a toy model in
tests/test_parallel_distributed.py; these tests are about the trainer on the real model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ranks import run_ranks  # noqa: E402
from _waiting import HANG_S  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "framer_dist" / "train.py"
TINY = REPO / "configs" / "tiny_cpu_demo.toml"
STEPS = 6
COMMON = ['data.source="synthetic"', "data.resolution=64", "train.global_batch_size=4",
          f"train.steps={STEPS}", "train.lr=1e-3", 'train.lr_schedule="warmup_cosine"',
          "train.warmup_steps=2", 'train.precision="fp32"', 'train.device="cpu"',
          "log.every=1", "log.heatmap_every=0", 'checkpoint.export=["control"]',
          "checkpoint.keep_last=10", 'parallel.activation_checkpointing="all"']


def _backend_args(backend: str, tmp: Path) -> list[str]:
    if backend == "deepspeed":
        ds = tmp / "zero3.json"  # tiny params must really be partitioned: threshold 0
        ds.write_text(json.dumps({"zero_optimization": {  # blocks as ZeRO-3 leaves (no leaf_module)
            "stage": 3, "stage3_param_persistence_threshold": 0,
            "reduce_bucket_size": 1 << 20, "allgather_bucket_size": 1 << 20}}))
        return ["--ds", str(ds)]
    return ["--backend", backend]


def launch(world: int, args: list[str], log: Path, during=None, bound: float = HANG_S) -> list[int]:
    """``world`` ranks of train.py (tests/_ranks.py); ``during(procs)`` may kill or signal them.
    10 ms polls: kill_in_save must catch a checkpoint while it is being written."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FRAMER_NO_PROGRESS="1", PYTHONWARNINGS="ignore",
               TORCH_EXTENSIONS_DIR=str(log.parent / "torch_ext"), PYTHONPATH=str(REPO))
    return run_ranks([sys.executable, str(TRAIN), *args], world, log, env, during=during,
                     bound=bound, poll=0.01)


def _losses(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def _by_step(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows}  # last record of a step wins


def _export(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(run_dir / "export" / "dit4sr_control.safetensors")


def _assert_close_rows(got: dict[int, dict], ref: dict[int, dict], atol: float, what: str) -> None:
    assert got, f"{what}: no losses logged"
    for step, row in got.items():
        for k in ("loss/noise", "loss/framer", "loss/total"):
            err = abs(row[k] - ref[step][k])
            assert err <= atol, f"{what}: step {step} {k} differs by {err:.3g} (atol {atol})"


def _assert_close_weights(a: dict, b: dict, atol: float, what: str) -> None:
    assert set(a) == set(b) and a, f"{what}: tensors differ"
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"{what}: weights differ by {worst:.3g}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """S: the same run in one process (backend none, micro-batch 2)."""
    from framer_dist.train import build_config, parse_args, train
    out = tmp_path_factory.mktemp("single") / "S"
    os.environ["FRAMER_NO_PROGRESS"] = "1"
    train(build_config(parse_args(["--config", str(TINY), "--out", str(out), *COMMON,
                                   "data.batch_size=2", "checkpoint.every=0"])))
    return out


@pytest.fixture(scope="module", params=["deepspeed", "fsdp2"])
def chain(request, tmp_path_factory) -> dict:
    backend = request.param
    tmp = tmp_path_factory.mktemp(backend)
    be = _backend_args(backend, tmp)
    base = ["--config", str(TINY), *be]
    two = [*COMMON, "data.batch_size=1"]
    res: dict = {"tmp": tmp, "backend": backend}

    # K: killed (-9, every rank) while a checkpoint (step >= 3) is being written
    k_dir = tmp / "K"
    ck = k_dir / "checkpoints"
    seen: dict = {}

    def kill_in_save(procs):
        # the first save in progress from step 3 on (a save can be too quick to catch: then the
        # next one)
        tmp_dirs = [p for p in ck.glob(".tmp-step_*") if int(p.name[-8:]) >= 3] \
            if ck.is_dir() else []
        if tmp_dirs:
            seen["valid_at_kill"] = sorted(p.name for p in ck.glob("step_*")
                                           if (p / "COMPLETE").is_file())
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            return True
        return False

    res["rc_K"] = launch(2, [*base, "--out", str(k_dir), *two, "checkpoint.every=1"],
                         tmp / "K.log", during=kill_in_save)
    res["K_rows"] = _losses(k_dir)
    res["valid_at_kill"] = seen.get("valid_at_kill")
    # K2: --resume auto; then SIGUSR1 to rank 1 only, once K2 has logged a step of its own
    n_before = len(res["K_rows"])

    def preempt(procs):
        if len(_losses(k_dir)) > n_before:
            os.kill(procs[1].pid, signal.SIGUSR1)
            return True
        return False

    res["rc_K2"] = launch(2, [*base, "--out", str(k_dir), *two, "checkpoint.every=0",
                              'checkpoint.preempt_signal="SIGUSR1"', "--resume", "auto"],
                          tmp / "K2.log", during=preempt)
    res["K2_log"] = (tmp / "K2.log").read_text()
    valid = set(res["valid_at_kill"] or [])
    p_ckpts = sorted(p for p in ck.glob("step_*") if p.name not in valid)
    res["P_ckpts"] = p_ckpts

    # C: elastic 2 -> 1 from P's checkpoint (micro-batch 2 keeps the same global layout)
    c_dir = tmp / "C"
    if p_ckpts:
        res["rc_C"] = launch(1, [*base, "--out", str(c_dir), *COMMON, "data.batch_size=2",
                                 "checkpoint.every=1", "--resume", str(p_ckpts[-1])],
                             tmp / "C.log")
    # E: elastic 1 -> 2 from C's first checkpoint
    c_ckpts = sorted((c_dir / "checkpoints").glob("step_*"))
    res["C_ckpts"] = c_ckpts
    if c_ckpts:
        res["rc_E"] = launch(2, [*base, "--out", str(tmp / "E"), *two, "checkpoint.every=0",
                                 "--resume", str(c_ckpts[0])], tmp / "E.log")
    res["logs"] = "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(tmp.glob("*.log")))
    return res


def test_kill_during_save_then_auto_resume_is_exact(chain, reference):
    assert chain["rc_K"] == [-9, -9], chain["logs"]
    assert chain["valid_at_kill"], "no save from step 3 on was observed in progress"
    # --resume auto took the newest COMPLETE checkpoint, never the half-written one
    m = re.search(r"resumed from \S*?(step_\d+) at step (\d+)", chain["K2_log"])
    assert m, chain["K2_log"][-2000:]
    assert m.group(1) == chain["valid_at_kill"][-1]
    resumed = int(m.group(2))
    assert resumed >= 2
    rows = _losses(chain["tmp"] / "K")
    # K logged the step whose save was killed; K2 recomputed it from the previous checkpoint:
    # a step computed twice gives bit-identical losses and grad norms (exact resume)
    seen: dict[int, list[dict]] = {}
    for r in rows:
        seen.setdefault(r["step"], []).append(r)
    repeated = {s: v for s, v in seen.items() if len(v) > 1}
    assert resumed + 1 in repeated, f"step {resumed + 1} should be logged by K and K2: {seen}"
    for s, (a, b, *_) in repeated.items():
        for key in ("loss/noise", "loss/framer", "loss/total", "grad_norm", "lr"):
            assert a[key] == b[key], f"step {s} {key}: {a[key]} before kill, {b[key]} after resume"
    # backend parity: every step logged matches the single-process run
    _assert_close_rows(_by_step(rows), _by_step(_losses(reference)), 1e-5,
                       f"{chain['backend']} vs single process")


def test_preemption_signal_to_one_rank(chain):
    assert chain["rc_K2"] == [75, 75], chain["logs"]
    assert len(chain["P_ckpts"]) == 1, chain["P_ckpts"]  # one collective checkpoint
    p = chain["P_ckpts"][0]
    assert (p / "COMPLETE").is_file()
    stopped = int(p.name.split("_")[1])
    assert stopped < STEPS
    rows = _losses(chain["tmp"] / "K")
    assert rows[-1]["step"] == stopped  # saved right after the step it stopped at


def test_elastic_2_to_1_to_2(chain, reference):
    ref = _by_step(_losses(reference))
    assert chain.get("rc_C") == [0], chain["logs"]
    start = int(chain["P_ckpts"][0].name.split("_")[1])
    c_rows = _by_step(_losses(chain["tmp"] / "C"))
    assert sorted(c_rows) == list(range(start + 1, STEPS + 1))
    _assert_close_rows(c_rows, ref, 1e-5, "resumed 2 -> 1")
    _assert_close_weights(_export(chain["tmp"] / "C"), _export(reference), 1e-5, "2 -> 1 weights")
    assert chain.get("rc_E") == [0, 0], chain["logs"]
    e_start = int(chain["C_ckpts"][0].name.split("_")[1])
    e_rows = _by_step(_losses(chain["tmp"] / "E"))
    assert sorted(e_rows) == list(range(e_start + 1, STEPS + 1))
    _assert_close_rows(e_rows, ref, 1e-5, "resumed 1 -> 2")
    _assert_close_weights(_export(chain["tmp"] / "E"), _export(reference), 1e-5, "1 -> 2 weights")
