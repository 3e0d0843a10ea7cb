"""CheckpointManager, RNG handling, preemption flag, config helpers: in-process with the `none`
backend and a tiny model (the 2-rank behaviour is in test_parallel_distributed.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_parallel import batch, make_model  # noqa: E402

from framer_dist.checkpoint import (MARKER, CheckpointManager, capture_rng, derived_seed,  # noqa: E402
                                    list_valid_checkpoints, restore_rng, seed_rng)
from framer_dist.config import ConfigError, load_config  # noqa: E402
from framer_dist.parallel import setup_backend  # noqa: E402
from framer_dist.parallel.blocks import ac_indices  # noqa: E402
from framer_dist.parallel.optim import lr_lambda, resolve_grad_accum  # noqa: E402
from framer_dist.preempt import PreemptionHandler  # noqa: E402


def _backend(*overrides: str):
    cfg = load_config(None, ["train.precision='fp32'", "train.lr=0.01", *overrides])
    model, params = make_model(0)
    return setup_backend(cfg, model, params)


def _train(be, steps: range) -> list[float]:
    out = []
    for s in steps:
        for x, y in batch(s, 0, 1, 4):
            loss = ((be.model(x) - y) ** 2).mean()
            be.backward(loss)
        be.step()
        out.append(loss.item())
    return out


def test_atomic_layout_keep_last_and_latest(tmp_path):
    be = _backend()
    mgr = CheckpointManager(tmp_path / "ck", be, keep_last=2)
    for s in range(1, 5):
        _train(be, range(s - 1, s))
        p = mgr.save(s, {"step": s, "samples_seen": 4 * s})
        assert (p / MARKER).is_file() and p.name == f"step_{s:08d}"
    names = [p.name for p in list_valid_checkpoints(tmp_path / "ck")]
    assert names == ["step_00000003", "step_00000004"]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_00000004"
    assert json.loads((tmp_path / "ck" / "step_00000004" / MARKER).read_text())["world_size"] == 1
    # saving the same step again keeps the first copy (periodic save followed by a preemption save)
    mtime = (tmp_path / "ck" / "step_00000004" / MARKER).stat().st_mtime_ns
    mgr.save(4, {"step": 4})
    assert (tmp_path / "ck" / "step_00000004" / MARKER).stat().st_mtime_ns == mtime


def test_auto_ignores_partial_and_errors_are_clear(tmp_path):
    be = _backend()
    root = tmp_path / "ck"
    mgr = CheckpointManager(root, be)
    assert mgr.resume("auto") is None  # nothing yet: a fresh start
    assert mgr.resume("") is None
    mgr.save(2, {"step": 2})
    # a killed save (temporary name) and a copied directory without marker: both ignored
    (root / ".tmp-step_00000009").mkdir()
    (root / "step_00000007").mkdir()
    (root / "step_00000007" / "client_state.pt").write_bytes(b"partial")
    assert mgr.find("auto").name == "step_00000002"
    with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
        mgr.find(str(root / "step_00000007"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mgr.find(str(root / "nope"))
    assert mgr.find(str(root)).name == "step_00000002"  # a root resolves through `latest`
    mgr.save(3, {"step": 3})
    assert not (root / ".tmp-step_00000009").exists()  # swept after a successful save


def test_resume_of_a_path_that_is_no_checkpoint_says_what_it_is(tmp_path, capsys):
    """`--resume PATH` naming something that is not a complete checkpoint says what PATH is: not a
    checkpoint folder at all (before: "no COMPLETE marker: the save was interrupted"), a stopped
    save with or without the marker, an incomplete step_*, a run folder, a file."""
    from framer_dist.checkpoint import find_checkpoint
    from framer_dist.train import main

    repo = Path(__file__).resolve().parent.parent
    run = tmp_path / "run"
    root = run / "checkpoints"
    CheckpointManager(root, _backend()).save(2, {"step": 2})
    (root / "latest").unlink()  # a root without the pointer
    done_tmp = root / ".tmp-step_00000004"  # stopped between the marker and the rename
    done_tmp.mkdir()
    (done_tmp / MARKER).write_text("{}")
    (root / ".tmp-step_00000006").mkdir()  # stopped while writing
    (root / "step_00000007").mkdir()  # a partial copy
    (tmp_path / "notes.txt").write_text("x")

    def why(path) -> str:
        with pytest.raises(FileNotFoundError) as e:
            find_checkpoint(root, str(path))
        msg = str(e.value)
        assert msg.startswith(f"config key 'checkpoint.resume': {path}") and "\n" not in msg, msg
        return msg

    msg = why(repo / "configs")
    assert "is not a checkpoint folder" in msg and "interrupted" not in msg, msg
    msg = why(done_tmp)
    assert "finished writing" in msg and "rename it to step_00000004" in msg, msg
    assert f"no {MARKER}" not in msg, msg
    assert "stopped while writing" in why(root / ".tmp-step_00000006")
    assert f"incomplete checkpoint (no {MARKER} marker" in why(root / "step_00000007")
    assert "is a run folder" in (msg := why(run)) and str(root / "step_00000002") in msg, msg
    assert f"e.g. {root / 'step_00000002'}" in why(root)
    assert "is a file" in why(tmp_path / "notes.txt")
    # the command line: exit 2, the one line, before any model
    argv = ["--config", str(repo / "configs" / "tiny_cpu_demo.toml"), "--out", str(tmp_path / "x"),
            'data.source="synthetic"', "--resume", str(repo / "configs")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("framer-train: error: config key 'checkpoint.resume'") and "\n" not in err
    assert "is not a checkpoint folder" in err, err


def test_resume_restores_model_optimizer_schedule_ema_and_rngs(tmp_path):
    over = ["train.lr_schedule='warmup_cosine'", "train.warmup_steps=2", "train.steps=6",
            "train.ema=true", "train.ema_decay=0.5"]
    gen = torch.Generator().manual_seed(5)
    a = _backend(*over)
    _train(a, range(3))
    mgr = CheckpointManager(tmp_path / "ck", a)
    torch.manual_seed(11), np.random.seed(12), random.seed(13), gen.manual_seed(14)
    mgr.save(3, {"step": 3, "samples_seen": 12}, gen)
    draws = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    rest_a = _train(a, range(3, 6))

    b = _backend(*over)
    gen_b = torch.Generator()
    client = CheckpointManager(tmp_path / "ck", b).resume("auto", generator=gen_b)
    assert client["samples_seen"] == 12 and client["step"] == 3
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen_b))
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2] == again[2] and torch.equal(draws[3], again[3])
    assert b.lr == pytest.approx(lr_lambda(b.cfg.train)(3) * 0.01)
    rest_b = _train(b, range(3, 6))
    assert rest_a == rest_b
    for k, v in a.full_trainable_state_dict().items():
        assert torch.equal(v, b.full_trainable_state_dict()[k])
    ea, eb = a.ema_state_dict(), b.ema_state_dict()
    assert ea and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_resume_without_ema_state_restarts_the_ema_from_the_loaded_weights(tmp_path, capsys):
    a = _backend()  # train.ema off: the checkpoint holds no EMA state
    _train(a, range(2))
    CheckpointManager(tmp_path / "ck", a).save(2, {"step": 2})
    b = _backend("train.ema=true", "train.ema_decay=0.5")
    CheckpointManager(tmp_path / "ck", b).resume("auto")
    assert "has no EMA state; EMA restarts from the weights" in capsys.readouterr().out
    ema, weights = b.ema_state_dict(), a.full_trainable_state_dict()
    assert ema.keys() == weights.keys() and all(torch.equal(ema[k], weights[k]) for k in ema)


def test_8bit_single_process_resume(tmp_path):
    a = _backend("train.optimizer='adamw8bit'")
    _train(a, range(2))
    CheckpointManager(tmp_path / "ck", a).save(2, {"step": 2})
    la = _train(a, range(2, 4))
    b = _backend("train.optimizer='adamw8bit'")
    CheckpointManager(tmp_path / "ck", b).resume("auto")
    assert _train(b, range(2, 4)) == la


def test_rng_helpers():
    assert derived_seed(0, 5, 1) == derived_seed(0, 5, 1)
    assert len({derived_seed(0, s, r) for s in range(4) for r in range(4)}) == 16
    g = torch.Generator()
    seed_rng(0, 3, 0, g)
    x = (torch.rand(2), torch.rand(2, generator=g))
    seed_rng(0, 3, 1, g)
    y = (torch.rand(2), torch.rand(2, generator=g))
    assert not torch.equal(x[0], y[0])      # per-rank streams differ
    assert torch.equal(x[1], y[1])          # the FRAMER generator is the same on every rank
    st = capture_rng(g)
    u = torch.rand(4)
    restore_rng(st, g)
    assert torch.equal(u, torch.rand(4))


def test_preemption_flag_from_a_real_signal():
    be = _backend()
    with PreemptionHandler("SIGUSR2") as pre:
        assert not pre.should_stop(be)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert pre.requested and pre.should_stop(be)
    with PreemptionHandler("none") as pre:
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM always requests a save
        assert pre.should_stop(be)
    with pytest.raises(ConfigError, match="preempt_signal"):
        PreemptionHandler("SIGHUP")


def test_global_batch_helper_and_ac_indices():
    train = load_config(None, ["train.global_batch_size=16"]).train
    assert resolve_grad_accum(train, 2, 1) == 8 and resolve_grad_accum(train, 2, 4) == 2
    with pytest.raises(ConfigError, match="train.global_batch_size.*not divisible"):
        resolve_grad_accum(train, 2, 3)
    assert resolve_grad_accum(load_config(None, ["train.grad_accum=3"]).train, 2, 5) == 3
    cfg = load_config(None, ["parallel.activation_checkpointing='every_k'", "parallel.ac_every_k=2"])
    assert ac_indices(cfg.parallel, 5) == [0, 2, 4]
    cfg = load_config(None, ["parallel.activation_checkpointing='blocks'", "parallel.ac_blocks=[0, -1]"])
    assert ac_indices(cfg.parallel, 4) == [0, 3]
    cfg = load_config(None, ["parallel.activation_checkpointing='blocks'", "parallel.ac_blocks=[9]"])
    with pytest.raises(ConfigError, match="ac_blocks"):
        ac_indices(cfg.parallel, 4)


def test_lr_schedules():
    cfg = load_config(None, ["train.lr_schedule='warmup_cosine'", "train.warmup_steps=2",
                             "train.steps=12", "train.min_lr_ratio=0.1"])
    f = lr_lambda(cfg.train)
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.1) and f(7) == pytest.approx(0.55)
    assert lr_lambda(load_config(None, []).train)(100) == 1.0


def test_distributed_backend_without_launcher_env_is_a_clear_error(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    cfg = load_config(None, ["parallel.backend='fsdp2'"])
    model, params = make_model()
    # one check of the launch (parallel.launcher_problem) up front, in setup_backend and before
    # joining the process group: the same one-line ConfigError naming the key
    with pytest.raises(ConfigError, match="^config key 'parallel.backend': 'fsdp2' needs a "
                                          "distributed launcher, but RANK, WORLD_SIZE"):
        setup_backend(cfg, model, params)
    from framer_dist.parallel import check_backend
    with pytest.raises(ConfigError, match="torchrun"):
        check_backend(cfg, 1)
    check_backend(cfg, 1, on_this_machine=False)  # a submitter on a login node
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="single-process"):
        setup_backend(load_config(None, []), model, params)
    with pytest.raises(ConfigError, match="single-process, but this was launched with WORLD_SIZE=2"):
        check_backend(load_config(None, []), 2)


def test_deepspeed_package_neither_shadows_the_library_nor_loads_the_fetch_counter():
    """framer_dist.parallel.deepspeed imports the real `deepspeed`, and the runtime (trainer and
    backend) never imports the benchmark/test fetch counter, which patches DeepSpeed's classes."""
    import subprocess

    code = ("import sys, framer_dist.train, framer_dist.parallel.deepspeed.backend as b, deepspeed; "
            "print(deepspeed.__file__); "
            "print('framer_dist.parallel.deepspeed.instrument' in sys.modules)")
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=repo / "framer_dist", capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(repo)), check=True).stdout.split()
    assert "framer_dist" not in out[-2] and out[-2].endswith(os.path.join("deepspeed", "__init__.py"))
    assert out[-1] == "False"


def test_ds_config_injection_and_disagreements(tmp_path):
    from framer_dist.parallel.base import BackendConfig
    from framer_dist.parallel.deepspeed.config import build_ds_config as build

    def build_ds_config(cfg, grad_accum, world_size):
        return build(BackendConfig.from_config(cfg), grad_accum, world_size)

    def cfg_with(ds: dict, *over: str):
        p = tmp_path / "ds.json"
        p.write_text(json.dumps(ds))
        return load_config(None, ["parallel.backend='deepspeed'", f"parallel.ds_config='{p}'", *over])

    repo = Path(__file__).resolve().parent.parent / "ds_configs"
    for name in ("zero2", "zero3", "zero3_offload"):
        cfg = load_config(None, ["parallel.backend='deepspeed'",
                                 f"parallel.ds_config='{repo / (name + '.json')}'",
                                 "train.precision='bf16'", "data.batch_size=2", "train.grad_clip=0.5"])
        ds = build_ds_config(cfg, grad_accum=3, world_size=2)
        assert ds["bf16"]["enabled"] is True and ds["train_batch_size"] == 12
        assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
        assert ds["zero_allow_untested_optimizer"] is True
    assert build_ds_config(cfg_with({}, "train.precision='fp32'"), 1, 1)["bf16"]["enabled"] is False
    with pytest.raises(ConfigError, match="train.precision"):
        build_ds_config(cfg_with({"bf16": {"enabled": True}}, "train.precision='fp32'"), 1, 1)
    with pytest.raises(ConfigError, match="'optimizer' section"):
        build_ds_config(cfg_with({"optimizer": {"type": "AdamW"}}), 1, 1)
    with pytest.raises(ConfigError, match="fp16"):
        build_ds_config(cfg_with({"fp16": {"enabled": True}}), 1, 1)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_ds_config(cfg_with({"gradient_accumulation_steps": 4}), 2, 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(load_config(None, ["parallel.backend='deepspeed'",
                                           f"parallel.ds_config='{bad}'"]), 1, 1)
    with pytest.raises(ConfigError, match="file not found"):
        build_ds_config(load_config(None, ["parallel.backend='deepspeed'",
                                           "parallel.ds_config='missing.json'"]), 1, 1)


def test_resume_with_another_optimizer_or_backend_is_a_clear_error(tmp_path):
    a = _backend()
    _train(a, range(1))
    CheckpointManager(tmp_path / "ck", a).save(1, {"step": 1})
    b = _backend("train.optimizer='adamw8bit'")
    with pytest.raises(RuntimeError, match="train.optimizer"):
        CheckpointManager(tmp_path / "ck", b).resume("auto")
    meta = tmp_path / "ck" / "step_00000001" / "backend_meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "backend": "fsdp2"}))
    with pytest.raises(RuntimeError, match="written by the 'fsdp2' backend"):
        CheckpointManager(tmp_path / "ck", _backend()).resume("auto")


def test_resume_from_an_older_checkpoint_starts_a_new_branch(tmp_path):
    """A rollback: resume from step 2 of a root that holds steps 1-4, train on with another LR.
    The new run's saves at steps 3 and 4 must hold the new state, and `auto` must continue the
    new branch, not the abandoned one (whose checkpoints are kept aside, not deleted). (The
    new branch differs here by its data; a changed train.lr would not show: the optimizer and
    schedule state come from the checkpoint.)"""
    root = tmp_path / "ck"
    a = _backend()
    mgr = CheckpointManager(root, a, keep_last=10)
    for s in range(1, 5):
        _train(a, range(s - 1, s))
        mgr.save(s, {"step": s})
    old3 = torch.load(root / "step_00000003" / "single_state.pt", weights_only=False)["model"]

    b = _backend()
    mgr_b = CheckpointManager(root, b, keep_last=10)
    assert mgr_b.resume(str(root / "step_00000002"))["step"] == 2
    _train(b, range(7, 8))  # other samples than the abandoned run's step 3
    p = mgr_b.save(3, {"step": 3})
    new3 = torch.load(p / "single_state.pt", weights_only=False)["model"]
    for k, v in b.full_trainable_state_dict().items():
        assert torch.equal(new3[k].float(), v), f"step 3 holds the abandoned run's {k}"
    assert any(not torch.equal(new3[k], old3[k]) for k in new3)
    assert mgr_b.find("auto").name == "step_00000003"
    assert (root / "latest").read_text().strip() == "step_00000003"
    aside = sorted(q.name for q in root.iterdir() if q.name.startswith("abandoned-"))
    assert [n.split("-")[-1] for n in aside] == ["step_00000003", "step_00000004"]
    assert all((root / n / MARKER).is_file() for n in aside)
