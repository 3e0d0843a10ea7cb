"""End-to-end runs of the real trainer (framer_dist/train.py) with the real tiny model, one process.

Covers issue 4's Must-show items about the loop: TensorBoard tags and the heat-map image read
back, clear config/path errors before any process group, every training mode trains and exports
and the exports reload into a plain model reproducing its outputs, a short FRAMER run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framer_dist.train import build_config, main, parse_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parallel_launch import free_port  # noqa: E402
from _waiting import HANG_S, run_exits_before_listening  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny_cpu_demo.toml")
SYN = 'data.source="synthetic"'
os.environ.setdefault("FRAMER_NO_PROGRESS", "1")


def _cfg(out: Path, *overrides: str):
    # Synthetic latents keep these runs to well under a second per step; the folder/photo path
    # is exercised by the demo test.
    return build_config(parse_args([
        "--config", TINY, "--out", str(out), 'data.source="synthetic"', "data.resolution=64",
        "data.batch_size=2", "log.every=1", *overrides]))


# ----------------------------------------------------------------------------------------------
# errors before any process group


@pytest.mark.parametrize("argv, names", [
    (["--config", "no/such/run.toml"], "no/such/run.toml"),
    (["--config", TINY, "train.stepz=3", SYN], "train.stepz"),
    (["--config", TINY, "train.lr=-1", SYN], "train.lr"),
    (["--config", TINY, "--ds", "no/such/zero3.json", SYN], "parallel.ds_config"),
    (["--config", TINY, 'data.path="no/such/photos"'], "data.path"),
    (["--config", TINY, "--resume", "no/such/step_00000010", SYN], "checkpoint.resume"),
    (["--config", TINY, 'model.pretrained="no/such/sd35"', SYN], "model.pretrained"),
    (["--config", TINY, 'checkpoint.export=["lora"]', SYN], "checkpoint.export"),
    (["--config", TINY, "train.global_batch_size=3", SYN], "train.global_batch_size"),
    (["--config", TINY, "data.resolution=48"], "data.resolution"),
    (["--config", TINY, f'model.pretrained="{REPO / "configs"}"', SYN], "model.pretrained"),
    (["--config", TINY, f'data.vae="{REPO / "configs"}"'], "data.vae"),
    (["--config", TINY, "--backend", "fsdp2", SYN], "parallel.backend"),
])
def test_bad_config_or_path_is_a_clear_error(argv, names, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err
    assert not torch.distributed.is_initialized()


def test_overrides_may_come_before_and_after_flags():
    """`... train.steps=2 --out DIR log.every=1 --resume auto`: every dotted override is kept
    (the docs allow any number of them anywhere, as `... --resume auto` appended to a command)."""
    args = parse_args(["--config", TINY, "train.steps=2", "--out", "x", "log.every=1",
                       "--resume", "auto", "data.batch_size=1"])
    assert args.overrides == ["train.steps=2", "log.every=1", "data.batch_size=1"]
    assert (args.out, args.resume) == ("x", "auto")


def test_data_source_errors_are_one_line(tmp_path, capsys):
    """Problems only the data source can see (a folder without images) end in one line naming
    the key and exit code 2, not a traceback."""
    empty = tmp_path / "photos"
    empty.mkdir()
    assert main(["--config", TINY, "--out", str(tmp_path / "run"), f'data.path="{empty}"']) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and str(empty) in err and "Traceback" not in err


def test_ds_json_contents_are_checked_before_the_launch(tmp_path, capsys):
    """A DeepSpeed JSON with its own optimizer section: refused up front, naming the file."""
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}))
    assert main(["--config", TINY, "--ds", str(ds), SYN]) == 2
    err = capsys.readouterr().err
    assert str(ds) in err and "optimizer" in err and "Traceback" not in err


def test_bad_ds_config_fails_before_the_process_group(tmp_path):
    """As the deepspeed launcher would start rank 0 of 2: a process group init would block
    waiting for rank 1, so an exit before rank 0 listens on MASTER_PORT proves the check ran
    first."""
    bad = tmp_path / "zero3.json"
    bad.write_text("{not json")
    port = free_port()
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONPATH=str(REPO))
    proc = run_exits_before_listening([sys.executable, str(REPO / "framer_dist" / "train.py"),
                                       "--local_rank=0", "--ds", str(bad), "--config", TINY, SYN],
                                      port, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "parallel.ds_config" in proc.stderr and str(bad) in proc.stderr


# ----------------------------------------------------------------------------------------------
# a short FRAMER run: logs, heat map, checkpoint, resume


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_framer_run_logs_documented_tags_heatmap_and_resumes(tmp_path):
    from framer_dist.checkpoint import is_valid_checkpoint
    from framer_dist.metrics import FRAMER_TAGS, IMAGE_TAGS, SCALAR_TAGS
    from framer_dist.train import train

    cfg = _cfg(tmp_path / "run", "train.steps=3", "checkpoint.every=2", "log.heatmap_every=2",
               "log.per_layer_scalars=true", "log.val_every=3", "checkpoint.export=[]")
    res = train(cfg)
    assert res.steps_done == 3 and not res.preempted
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss/noise", "loss/framer", "loss/total"))
        # total = noise + lambda * framer, as logged (averaged the same way)
        assert r["loss/total"] == pytest.approx(r["loss/noise"] + cfg.framer.weight * r["loss/framer"],
                                                rel=1e-5)
    assert rows[0]["loss/framer"] > 0

    acc = _events(res.log_dir)
    tags = acc.Tags()
    for tag in SCALAR_TAGS + FRAMER_TAGS:
        assert tag in tags["scalars"], f"missing scalar {tag}: {tags['scalars']}"
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3]
    assert acc.Scalars("loss/total")[-1].value == pytest.approx(rows[-1]["loss/total"], rel=1e-6)
    assert "framer/w_lf/layer_00" in tags["scalars"] and "framer/cos_hf/layer_02" in tags["scalars"]
    for tag in IMAGE_TAGS + ("val/sr",):
        assert tag in tags["images"], f"missing image {tag}: {tags['images']}"
    heat = acc.Images("framer/heatmap")
    assert [e.step for e in heat] == [1, 2]
    assert heat[0].width > 50 and heat[0].height > 50

    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000003"]
    assert all(is_valid_checkpoint(p) for p in ckpts)

    # resume auto from step 3 and continue to 5: history continues, no step repeats
    cfg2 = _cfg(tmp_path / "run", "train.steps=5", "checkpoint.every=0", "log.heatmap_every=0",
                "checkpoint.export=[]", 'checkpoint.resume="auto"')
    res2 = train(cfg2)
    assert [h["step"] for h in res2.history] == [4, 5]


def test_resume_discards_the_interrupted_runs_later_events(tmp_path):
    """A run checkpoints at step 2, logs step 3 and dies before its next checkpoint; the resumed
    run starts from step 2 and logs step 3 again. Read back from the real event files, every
    scalar and image has each step once (the interrupted run's step 3 purged), as TensorBoard
    users expect after a restart."""
    from framer_dist.train import train

    over = ("checkpoint.every=2", "log.heatmap_every=1", "checkpoint.export=[]")
    first = train(_cfg(tmp_path / "run", "train.steps=3", *over))
    assert [e.step for e in _events(first.log_dir).Scalars("loss/total")] == [1, 2, 3]
    step2 = tmp_path / "run" / "checkpoints" / "step_00000002"
    res = train(_cfg(tmp_path / "run", "train.steps=4", *over, f'checkpoint.resume="{step2}"'))
    assert [h["step"] for h in res.history] == [3, 4]
    assert len(list(res.log_dir.glob("events.out.tfevents.*"))) == 2  # one file per process
    acc = _events(res.log_dir)
    for tag in ("loss/total", "loss/framer", "lr", "grad_norm"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4], tag
    assert [e.step for e in acc.Images("framer/heatmap")] == [1, 2, 3, 4]
    assert acc.Scalars("loss/total")[2].value == pytest.approx(res.history[0]["loss/total"], rel=1e-6)


def test_a_finished_run_ends_with_one_line_saying_where_everything_is(tmp_path, capsys):
    """`train.py` ends with one line: the steps done, the time, and where the last checkpoint, the
    exports and the TensorBoard logs are (every path named there exists)."""
    out = tmp_path / "run"
    assert main(["--config", TINY, "--out", str(out), SYN, "data.resolution=64", "train.steps=2",
                 'checkpoint.export=["control"]', "log.heatmap_every=0", "log.val_every=0"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[framer_dist] done:")]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "step 2 of 2 (2 this run) in " in line, line
    ckpt = out / "checkpoints" / "step_00000002"
    export = out / "export" / "dit4sr_control.safetensors"
    for path in (ckpt, export, out / "tb"):
        assert str(path) in line and path.exists(), (path, line)
    assert f"tensorboard --logdir {out / 'tb'}" in line


@pytest.mark.slow
def test_data_report_lines_do_not_share_the_progress_bars_line(tmp_path):
    """`make demo`'s console (stdout and stderr in one terminal, the bar on): the grayscale
    photo's `data: converted_gray: camera` line stands on its own line, not after the bar's text
    (`1/4 [...]data: ...`); the run ends with the counts."""
    env = {k: v for k, v in os.environ.items() if k != "FRAMER_NO_PROGRESS"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "framer_dist" / "train.py"), "--config", TINY, "--out",
         str(tmp_path / "run"), f'data.path="{REPO / "framer_dist" / "assets" / "photos"}"',
         "train.steps=4", "log.every=2", "log.heatmap_every=0", "log.val_every=0",
         "checkpoint.export=[]"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=HANG_S,
        env=dict(env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.replace("\r", "\n").splitlines()
    assert "data: converted_gray: camera" in lines, proc.stdout[-3000:]
    glued = [l for l in lines if "data: " in l and not l.startswith("data: ")]
    assert not glued, glued
    assert any(l.startswith("data: converted_gray=") for l in lines), proc.stdout[-3000:]


def test_zero_learning_rate_is_warned_once_naming_the_key(tmp_path, capsys, monkeypatch):
    """`train.lr=0` is valid but trains every step without changing a weight: one warning line at
    the start, naming the key, from rank 0 only; a normal lr gives none."""
    from framer_dist.train import train

    def warnings_of(out: Path, *over: str) -> list[str]:
        train(_cfg(out, "train.steps=1", "checkpoint.export=[]", "log.heatmap_every=0", *over))
        return [l for l in capsys.readouterr().out.splitlines() if "WARNING" in l]

    got = warnings_of(tmp_path / "a", "train.lr=0")
    assert len(got) == 1 and "config key 'train.lr'" in got[0] and "no weight changes" in got[0], got
    assert warnings_of(tmp_path / "b", "train.lr=1e-3") == []
    monkeypatch.setenv("RANK", "1")  # another rank of a launch: rank 0 says it
    assert warnings_of(tmp_path / "c", "train.lr=0") == []


def test_fresh_start_over_earlier_checkpoints_is_refused(tmp_path, capsys):
    """A run without --resume in an out_dir that holds checkpoints would keep the earlier run's
    step_N ("same step saved twice: keep the first"), leave `latest` on the earlier run and mix
    two runs in one folder; the CLI refuses before anything starts and says how to go on."""
    out = str(tmp_path / "run")
    base = ["--config", TINY, "--out", out, SYN, "data.resolution=64", "train.steps=1",
            "checkpoint.export=[]", "log.heatmap_every=0"]
    assert main(base) == 0
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "checkpoint.resume" in err and "--resume auto" in err and "Traceback" not in err
    assert main(base + ["train.steps=2", "--resume", "auto"]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [
        "step_00000001", "step_00000002"]


def test_checkpoint_of_another_backend_or_optimizer_is_refused_before_the_model(tmp_path, capsys):
    """A checkpoint's backend_meta.json says which backend, optimizer and training mode wrote it:
    resuming it with another one is a one-line error (exit 2) from the up-front checks, before any model or
    process group, naming the checkpoint and both values."""
    out = tmp_path / "run"
    base = ["--config", TINY, "--out", str(out), SYN, "data.resolution=64", "train.steps=1",
            "checkpoint.export=[]", "log.heatmap_every=0"]
    assert main(base) == 0  # a real checkpoint of the 'none' backend with AdamW state
    ckpt = out / "checkpoints" / "step_00000001"
    capsys.readouterr()
    assert main(base + ["train.steps=2", "--resume", "auto", 'train.optimizer="adamw8bit"']) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "'adamw'" in err and "'adamw8bit'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # another training mode: another trainable set (control -> lora)
    assert main(base + ["train.steps=2", "--resume", "auto", 'train.mode="lora"']) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "train.mode='control'" in err and "'lora'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

    # another backend, launched as rank 0 of 2: a process group init would wait for rank 1, so an
    # exit 2 before rank 0 listens on MASTER_PORT shows the check ran first
    port = free_port()
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONPATH=str(REPO), FRAMER_NO_PROGRESS="1")
    proc = run_exits_before_listening([sys.executable, str(REPO / "framer_dist" / "train.py"),
                                       "--backend", "fsdp2", *base, "train.steps=2", "--resume",
                                       str(ckpt)], port, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(ckpt) in proc.stderr and "'none' backend" in proc.stderr
    assert "parallel.backend='fsdp2'" in proc.stderr and "--backend none" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# training modes and exports


def _probe_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 16, 8, 8, generator=g),
                lr_latent=torch.randn(2, 16, 8, 8, generator=g),
                timestep=torch.tensor([250.0, 800.0]),
                encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g))


@pytest.mark.parametrize("mode, exports", [
    ("control", ["control", "diffusers"]),
    ("lora", ["control", "lora", "diffusers"]),
    ("full", ["diffusers"]),     # trained in bf16 autocast (fp32 master weights)
])
def test_mode_trains_exports_and_reloads(tmp_path, mode, exports):
    from framer_dist.config import ModelConfig
    from framer_dist.models.dit4sr import build_model, load_control, load_lora
    from framer_dist.train import train

    # lr large enough that 2 steps move the zero-initialised layers measurably
    ema = "true" if mode == "lora" else "false"  # one mode also exports its EMA weights
    cfg = _cfg(tmp_path / mode, f'train.mode="{mode}"', "train.steps=2", "train.lr=1e-2",
               f"train.ema={ema}", "train.ema_decay=0.5",
               f'train.precision="{"bf16" if mode == "full" else "fp32"}"',
               "checkpoint.every=0", "log.heatmap_every=0", "dit4sr.lora.rank=4",
               f"checkpoint.export={json.dumps(exports)}")
    res = train(cfg)
    assert set(res.exports) == set(exports) | ({f"ema_{k}" for k in exports} if mode == "lora" else set())
    trained = res.model.eval()
    x = _probe_inputs()
    with torch.no_grad():
        want = trained(**x).sample
        torch.manual_seed(cfg.train.seed)  # the trainer's init: same random "pretrained" base
        fresh = build_model(cfg.model)
        baseline = fresh(**x).sample  # same seed-0 init, untrained
    assert (want - baseline).abs().max() > 1e-4, "training did not change the outputs"

    if "diffusers" in exports:
        plain = build_model(ModelConfig(preset="tiny", pretrained=str(res.exports["diffusers"])))
        with torch.no_grad():
            got = plain.eval()(**x).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if "control" in exports and mode == "control":
        torch.manual_seed(cfg.train.seed)
        plain = build_model(cfg.model)
        load_control(plain, res.exports["control"])
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(**x).sample, want, rtol=0, atol=0)
    if "lora" in exports:
        torch.manual_seed(cfg.train.seed)
        plain = build_model(cfg.model)
        load_control(plain, res.exports["control"])
        load_lora(plain, res.exports["lora"])
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(**x).sample, want, rtol=1e-5, atol=1e-6)
    if mode == "lora":  # the EMA export differs from the last weights (decay 0.5, 2 steps)
        from safetensors.torch import load_file
        last, avg = load_file(res.exports["control"]), load_file(res.exports["ema_control"])
        assert set(last) == set(avg)
        assert max((last[k] - avg[k]).abs().max().item() for k in last) > 0


def test_lora_run_in_bf16_holds_frozen_layers_in_bf16_validates_and_exports(tmp_path):
    """precision bf16 on the 'none' backend holds the frozen layers in bf16 (train.frozen_bf16):
    validation sampling, the heat map, checkpoints, a resume and the exports all work with it,
    and the whole-transformer export holds those weights as the run used them (bf16 values)."""
    from framer_dist.config import ModelConfig
    from framer_dist.models.dit4sr import build_model
    from framer_dist.train import train

    common = ('train.mode="lora"', 'train.precision="bf16"', "dit4sr.lora.rank=4", "train.lr=1e-2",
              "log.val_every=2", "log.heatmap_every=2", "checkpoint.every=2",
              'checkpoint.export=["lora", "diffusers"]')
    res = train(_cfg(tmp_path / "run", *common, "train.steps=2"))
    q = res.model.transformer_blocks[0].attn.to_q
    assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A["default"].weight.dtype == torch.float32
    res2 = train(_cfg(tmp_path / "run", *common, "train.steps=3", 'checkpoint.resume="auto"'))
    assert res2.steps_done == 3
    exported = build_model(ModelConfig(preset="tiny", pretrained=str(res2.exports["diffusers"])))
    torch.manual_seed(0)                  # the trainer's init: the same random "pretrained" base
    base = build_model(ModelConfig(preset="tiny"))
    w = exported.transformer_blocks[0].ff.net[2].weight      # frozen, not a LoRA target
    assert w.dtype == torch.float32
    assert torch.equal(w, base.transformer_blocks[0].ff.net[2].weight.to(torch.bfloat16).float())


def test_accumulation_notes_that_intercl_sees_one_forward(tmp_path, capsys):
    """InterCL's in-batch keys are gathered per forward: with gradient accumulation the run says
    how many images InterCL compares against (the batch of docs/specs/framer.md is one forward)."""
    from framer_dist.train import train

    common = ("train.steps=1", "checkpoint.every=0", "checkpoint.export=[]", "log.heatmap_every=0")
    train(_cfg(tmp_path / "accum", *common, "train.global_batch_size=4"))
    out = capsys.readouterr().out
    assert "InterCL compares each image with the 2 images of one forward" in out
    assert "global batch of 4 (2 accumulated" in out
    train(_cfg(tmp_path / "one", *common, "train.global_batch_size=2"))
    assert "InterCL compares" not in capsys.readouterr().out


def test_config_toml_survives_a_crash_mid_write(tmp_path):
    """The run folder's config.toml is rewritten on every (re)start; a crash or a full disk in the
    middle of that write must leave the previous one whole, not a truncated file."""
    from _disk_full import run_with_file_size_limit

    out = tmp_path / "run"
    base = ["--config", TINY, "--out", str(out), SYN, "data.resolution=64", "train.steps=1",
            "checkpoint.export=[]", "log.heatmap_every=0"]
    assert main(base) == 0
    before = (out / "config.toml").read_text()
    resume = base + ["train.steps=2", "--resume", "auto"]
    code = ("import os, sys\nos.environ['FRAMER_NO_PROGRESS'] = '1'\n"
            f"from framer_dist.train import main\nsys.exit(main({resume!r}))\n")
    proc = run_with_file_size_limit(code, limit=len(before) // 2)
    assert proc.returncode != 0 and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert "config.toml" in proc.stderr  # it failed writing the config, not before
    assert (out / "config.toml").read_text() == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_cached_data_other_than_the_manifest_fails_before_the_model(tmp_path, capsys):
    """data.source='cached' with a data.scale the cache was not prepared with: one line naming
    both values and the manifest, exit 2, from the up-front checks."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"resolution": 64, "scale": 4}))
    assert main(["--config", TINY, "--out", str(tmp_path / "run"), 'data.source="cached"',
                 f'data.path="{cache}"', "data.resolution=64", "data.scale=2"]) == 2
    err = capsys.readouterr().err
    assert "data.scale=2" in err and "scale=4" in err and str(cache / "manifest.json") in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before the run folder or the model
