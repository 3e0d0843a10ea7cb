"""FRAMER_U through the real trainer: the pisasr family's tiny U-Net on the bundled photographs,
both stages as two launches, on backend none, FSDP2 and DeepSpeed ZeRO-3 (2 ranks over gloo),
activation checkpointing on every block, fp32.

Launches (each one run of train.py, as a launcher starts it):

    S1  1 process, stage pix, 4 steps (checkpoints at 2 and 4), exports lora + diffusers
    S2  1 process, stage sem from S1's final checkpoint, 2 steps, exports lora + diffusers
    F1 / Z1   2 ranks FSDP2 / ZeRO-3, stage pix, as S1
    F1r / Z1r 2 ranks, resume F1 / Z1 at step 2, to step 4
    F2 / Z2   2 ranks, stage sem from S1's checkpoint, as S2
    E   1 process FSDP2, resumes F1 at step 2 (elastic 2 -> 1), to step 4
    Z2b 2 ranks ZeRO-2, stage pix, 2 steps

The same global batch of 4 in forwards of 2 images everywhere (InterCL compares within a forward):
micro 2 x accumulation 2 on one process, micro 1 x 2 ranks x accumulation 2. Every random draw
of the family (degradation, null prompt, VAE posterior sample, CSD timestep and noise) is keyed
by the sample's global position, so the runs must agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TRAIN = REPO / "framer_dist" / "train.py"
CONFIG = REPO / "configs" / "tiny_pisasr_cpu.toml"
sys.path.insert(0, str(TESTS))
from _ranks import run_ranks  # noqa: E402
from _waiting import HANG_S  # noqa: E402

STEPS = 4
COMMON = ["--config", str(CONFIG), 'model.family="_pisasr_counting:FAMILY"',
          "train.global_batch_size=4", f"train.steps={STEPS}", "train.lr=1e-4",
          "log.every=1", "log.progress=false", "checkpoint.every=2", "checkpoint.keep_last=5",
          'parallel.activation_checkpointing="all"', 'checkpoint.export=["lora", "diffusers"]']
SEM = ['train.mode="sem"', "train.steps=2"]
PIX_KEYS = ("loss/stage", "loss/mse", "loss/framer", "loss/total", "grad_norm")
# stage sem: CSD's CFG takes the difference of two nearly equal outputs of the random tiny
# frozen U-Net (x 7.5), so the rounding of its batch of 2B (4 here, 2 per rank) shows up at
# ~5e-6 in the CSD gradient; the gradient norm is not compared there, the losses are
SEM_KEYS = ("loss/stage", "loss/mse", "loss/lpips", "loss/csd", "loss/framer", "loss/total")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", FRAMER_NO_PROGRESS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))


def _ds(tmp: Path, stage: int) -> list[str]:
    p = tmp / f"zero{stage}.json"  # tiny params must really be partitioned: threshold 0
    p.write_text(json.dumps({"zero_optimization": {
        "stage": stage, "stage3_param_persistence_threshold": 0,
        "reduce_bucket_size": 1 << 20, "allgather_bucket_size": 1 << 20}}))
    return ["--ds", str(p)]


def _rows(out: Path) -> dict[int, dict]:
    f = out / "metrics.jsonl"
    return {r["step"]: r for r in map(json.loads, f.read_text().splitlines())} if f.is_file() else {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pisasr_train")
    res: dict = {"tmp": tmp, "rc": {}}

    def go(name: str, world: int, *args: str) -> None:
        cmd = [sys.executable, str(TRAIN), *COMMON, "--out", str(tmp / name),
               f"data.batch_size={2 if world == 1 else 1}", *args]
        res["rc"][name] = run_ranks(cmd, world, tmp / f"{name}.log", _env(), bound=HANG_S)

    s1_ckpts = tmp / "S1" / "checkpoints"
    go("S1", 1)
    go("S2", 1, *SEM, f"pisasr.init_from={json.dumps(str(s1_ckpts))}")
    for tag, backend in (("F", ["--backend", "fsdp2"]), ("Z", _ds(tmp, 3))):
        go(f"{tag}1", 2, *backend)
        go(f"{tag}1r", 2, *backend, "--resume", str(tmp / f"{tag}1" / "checkpoints" / "step_00000002"))
        go(f"{tag}2", 2, *backend, *SEM, f"pisasr.init_from={json.dumps(str(s1_ckpts))}")
    go("E", 1, "--backend", "fsdp2", "--resume", str(tmp / "F1" / "checkpoints" / "step_00000002"))
    go("Z2b", 2, *_ds(tmp, 2), "train.steps=2", "checkpoint.export=[]")
    res["logs"] = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2500:]}"
                            for f in sorted(tmp.glob("*.log")))
    return res


def _ok(runs, *names: str) -> None:
    for n in names:
        world = 1 if n in ("S1", "S2", "E") else 2
        assert runs["rc"][n] == [0] * world, f"{n}: exit codes {runs['rc'][n]}\n{runs['logs']}"


def _close(got: dict[int, dict], want: dict[int, dict], keys, steps, what: str) -> None:
    for s in steps:
        assert s in got and s in want, f"{what}: step {s} missing ({sorted(got)}, {sorted(want)})"
        for k in keys:
            assert got[s][k] == pytest.approx(want[s][k], rel=1e-5, abs=1e-7), \
                f"{what}: step {s} {k}: {got[s][k]} vs {want[s][k]}"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from framer_dist.parallel import read_checkpoint_weights
    return read_checkpoint_weights(path)


pytestmark = [pytest.mark.slow]


def test_stage_1_then_stage_2_train_only_their_sets(runs):
    """S1 changes the pix set and the heads and nothing else; S2 starts from S1's checkpoint
    (weights and heads), changes the sem set and the heads, and leaves the pix set bit-identical."""
    from safetensors.torch import load_file

    from framer_dist.config import load_config
    from framer_dist.models import get_family

    _ok(runs, "S1", "S2")
    tmp = runs["tmp"]
    s1, s2 = _rows(tmp / "S1"), _rows(tmp / "S2")
    assert sorted(s1) == [1, 2, 3, 4] and sorted(s2) == [1, 2]
    assert set(s1[1]) >= {"loss/stage", "loss/mse", "loss/framer"} and "loss/csd" not in s1[1]
    assert set(s2[1]) >= {"loss/stage", "loss/mse", "loss/lpips", "loss/csd", "loss/framer"}
    assert s2[1]["loss/lpips"] >= 0  # the random LPIPS keeps lpips' non-negative linear layers
    assert "pisasr.init_from: " in (tmp / "S2.log").read_text()
    # the checkpoint root was pinned to the step folder it named when stage 2 started
    assert f'init_from = "{tmp / "S1" / "checkpoints" / "step_00000004"}"' in \
        (tmp / "S2" / "config.toml").read_text()

    # the initial model: what train() builds before the first step (seeded by train.seed)
    cfg = load_config(str(CONFIG))
    torch.manual_seed(cfg.train.seed)
    init = dict(get_family("pisasr").build(cfg).named_parameters())
    ck1 = _weights(tmp / "S1" / "checkpoints" / "step_00000004")
    ck2 = _weights(tmp / "S2" / "checkpoints" / "step_00000002")
    pix = {k for k in init if "lora_" in k and k.split(".")[-2].endswith("_pix")}
    sem = {k for k in init if "lora_" in k and k.split(".")[-2].endswith("_sem")}
    heads = {k for k in init if k.startswith("framer_heads.")}
    assert pix and sem and heads
    assert set(ck1) == pix | heads and set(ck2) == sem | heads  # checkpoints: the trained set
    assert all(not torch.equal(ck1[k], init[k]) for k in heads)
    assert sum(not torch.equal(ck1[k], init[k]) for k in pix) > len(pix) // 2
    assert sum(not torch.equal(ck2[k], init[k]) for k in sem) > len(sem) // 2
    assert all(not torch.equal(ck2[k], ck1[k]) for k in heads)  # stage 2 trains the heads on

    lora1 = load_file(str(tmp / "S1" / "export" / "pisasr_lora.safetensors"))
    lora2 = load_file(str(tmp / "S2" / "export" / "pisasr_lora.safetensors"))
    assert set(lora1) == set(lora2) == pix | sem  # both sets, no heads, nothing else
    for k in pix:
        assert torch.equal(lora1[k], ck1[k]) and torch.equal(lora2[k], ck1[k]), k
    for k in sem:
        assert torch.equal(lora1[k], init[k]) and torch.equal(lora2[k], ck2[k]), k


def test_export_is_a_stock_unet_without_heads(runs):
    """The diffusers export is a stock UNet2DConditionModel of the preset's exact size, both sets
    merged, no head (its output: test_framer_sr_without_heads_equals_the_training_forward)."""
    from diffusers import UNet2DConditionModel

    from framer_dist.models.pisasr import preset_config

    _ok(runs, "S2")
    tmp = runs["tmp"]
    unet = UNet2DConditionModel.from_pretrained(str(tmp / "S2" / "export" / "unet"))
    stock = UNet2DConditionModel(**preset_config("unet-tiny"))
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in stock.parameters())
    assert not any("framer" in k or "lora" in k for k in unet.state_dict())


def _base_of(tmp: Path) -> dict[str, torch.Tensor]:
    """The frozen base U-Net weights the runs used (random init under train.seed), by the stock
    U-Net's parameter names."""
    from framer_dist.config import load_config
    from framer_dist.models import get_family

    cfg = load_config(str(CONFIG))
    torch.manual_seed(cfg.train.seed)
    m = get_family("pisasr").build(cfg)
    return {k.replace(".base_layer", ""): v for k, v in m.unet.state_dict().items()
            if "lora_" not in k}


@pytest.mark.distributed
@pytest.mark.parametrize("tag", ["F", "Z"])
def test_two_ranks_equal_one_process_both_stages(runs, tag):
    _ok(runs, "S1", "S2", f"{tag}1", f"{tag}2")
    tmp = runs["tmp"]
    _close(_rows(tmp / f"{tag}1"), _rows(tmp / "S1"), PIX_KEYS, range(1, STEPS + 1), f"{tag}1 vs S1")
    _close(_rows(tmp / f"{tag}2"), _rows(tmp / "S2"), SEM_KEYS, (1, 2), f"{tag}2 vs S2")
    # (weights are not compared: AdamW divides by sqrt(v) + eps, so a LoRA B entry whose gradient
    # is ~eps turns rounding differences of 1e-11 into visible update differences)


@pytest.mark.distributed
@pytest.mark.parametrize("tag", ["F", "Z"])
def test_resume_is_bit_exact(runs, tag):
    _ok(runs, f"{tag}1", f"{tag}1r")
    tmp = runs["tmp"]
    full, resumed = _rows(tmp / f"{tag}1"), _rows(tmp / f"{tag}1r")
    assert sorted(resumed) == [3, 4]
    for s in (3, 4):
        for k in PIX_KEYS:
            assert resumed[s][k] == full[s][k], (s, k)
    a = _weights(tmp / f"{tag}1" / "checkpoints" / "step_00000004")
    b = _weights(tmp / f"{tag}1r" / "checkpoints" / "step_00000004")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
def test_elastic_two_ranks_to_one(runs):
    _ok(runs, "E", "S1")
    tmp = runs["tmp"]
    e = _rows(tmp / "E")
    assert sorted(e) == [3, 4]
    _close(e, _rows(tmp / "S1"), PIX_KEYS, (3, 4), "2 -> 1 vs S1")


@pytest.mark.distributed
def test_zero2_trains(runs):
    _ok(runs, "Z2b")
    rows = _rows(runs["tmp"] / "Z2b")
    assert sorted(rows) == [1, 2] and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows.values())
    _close(rows, _rows(runs["tmp"] / "S1"), PIX_KEYS, (1, 2), "ZeRO-2 vs S1")


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["S1", "S2", "F1", "F2", "Z1", "Z2"])
def test_features_captured_exactly_once_under_checkpointing(runs, name):
    """Every block checkpointed: each micro-batch's forward runs every head once, and backward
    recomputes each once (the last micro-batch's backward comes after the last report)."""
    _ok(runs, name)
    world = 1 if name.startswith("S") else 2
    for r in range(world):
        rec = json.loads((runs["tmp"] / name / f"readouts_rank{r}.json").read_text())
        steps = STEPS if name.endswith("1") else 2
        assert rec["calls"] == steps * 2  # 2 micro-batches per step
        assert rec["checkpointed"] == list(range(7)) and rec["heads"] == 6
        assert rec["forward"] == rec["heads"] * rec["calls"], rec
        assert rec["recomputed"] == rec["heads"] * (rec["calls"] - 1), rec


def _trained_module(tmp: Path):
    """The training module at the end of S2, heads included: the base, S1's pix set, S2's sem set
    and heads."""
    from framer_dist.config import load_config
    from framer_dist.models import get_family

    cfg = load_config(str(CONFIG))
    torch.manual_seed(cfg.train.seed)
    model = get_family("pisasr").build(cfg)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for ck in (tmp / "S1" / "checkpoints" / "step_00000004",
                   tmp / "S2" / "checkpoints" / "step_00000002"):
            for k, v in _weights(ck).items():
                own[k].copy_(v)
    from framer_dist.models.pisasr import set_active_sets
    set_active_sets(model.unet, ("pix", "sem"))  # the trained model: both sets in the forward
    return model.eval()


def _opts(**family):
    from framer_dist.infer.pipeline import InferenceOptions
    return InferenceOptions(steps=1, guidance=1.0, family_options={"lambda_pix": 1.0,
                                                                   "lambda_sem": 1.0, **family})


def test_framer_sr_without_heads_equals_the_training_forward(runs, tmp_path):
    """framer-sr's pisasr sampler on the exports (the merged U-Net, and the LoRA file on --base)
    gives the training module's z_H (heads present there, unused); --lambda-sem 0 gives the pix
    set alone; a merged U-Net refuses the adjustable mode in one line."""
    from diffusers import UNet2DConditionModel

    from framer_dist.infer.loading import load_model
    from framer_dist.models import ModelLoadError, get_family
    from framer_dist.models.pisasr import preset_config, using_sets

    _ok(runs, "S1", "S2")
    tmp = runs["tmp"]
    spec = get_family("pisasr").inference
    trained = _trained_module(tmp)
    assert trained.framer_heads is not None
    full = load_model(tmp / "S2" / "export")
    assert full.framer_heads is None and type(full).__name__ == "PiSASRUNet"
    base = tmp_path / "base"
    stock = UNet2DConditionModel(**preset_config("unet-tiny"))
    stock.load_state_dict(_base_of(tmp))
    stock.save_pretrained(str(base / "unet"))
    lora = load_model(tmp / "S2" / "export" / "pisasr_lora.safetensors", base=base)
    assert lora.framer_heads is None

    g = torch.Generator().manual_seed(5)
    z, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 16, generator=g)
    cond = (c, c.new_zeros(2, 0))
    with torch.no_grad():
        want = trained(z, c).z_h
        with using_sets(trained.unet, ("pix",)):
            want_pix = trained(z, c).z_h
        got_full = spec.sample(full, z, cond, None, _opts(), seed=0)
        got_lora = spec.sample(lora, z, cond, None, _opts(), seed=0)
        got_pix = spec.sample(lora, z, cond, None, _opts(lambda_sem=0.0), seed=0)
    assert (got_lora - want).abs().max() < 1e-5
    assert (got_full - want).abs().max() < 1e-4  # the merge rounds W + BA once
    assert (got_pix - want_pix).abs().max() < 1e-5 and (want_pix - want).abs().max() > 1e-4
    with pytest.raises(ModelLoadError, match="--lambda-pix/--lambda-sem need the LoRA export"):
        spec.sample(full, z, cond, None, _opts(lambda_sem=0.0), seed=0)
    with pytest.raises(ModelLoadError, match="one-step models without CFG"):
        spec.sample(full, z, cond, None, dataclasses.replace(_opts(), steps=4), seed=0)


def test_framer_sr_command_line_on_a_pisasr_export(runs, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from framer_dist.infer.cli import main

    _ok(runs, "S2")
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(src)
    common = ["--vae", "", "--text-encoders", "hashed", "--prompt", "x", "--scale", "4",
              "--process-size", "0", "--no-progress"]
    assert main([str(src.parent), str(tmp_path / "out"), "--checkpoint",
                 str(runs["tmp"] / "S2" / "export"), *common]) == 0
    assert "loading the full checkpoint" in capsys.readouterr().err
    (out,) = sorted((tmp_path / "out").glob("*.png"))
    assert Image.open(out).size == (64, 48)
    rc = main([str(src.parent), str(tmp_path / "out2"), "--checkpoint",
               str(runs["tmp"] / "S2" / "export"), "--lambda-sem", "0", *common])
    err = capsys.readouterr().err
    assert rc != 0 and "--lambda-pix/--lambda-sem need the LoRA export" in err
    assert "Traceback" not in err
    # a trainer checkpoint (heads inside) is the analysis' input, not framer-sr's
    rc = main([str(src.parent), str(tmp_path / "out3"), "--checkpoint",
               str(runs["tmp"] / "S2" / "checkpoints"), *common])
    err = capsys.readouterr().err
    assert rc == 2 and "a trainer checkpoint (kind trainer, with the FRAMER heads)" in err


def test_analyze_hierarchy_on_pisasr_trainer_checkpoints(runs, tmp_path, capsys):
    """Fig. 7 / Fig. 9 for U-Net checkpoints: the trainer checkpoints of both stages (heads
    included; the family from their metadata), rebuilt as their runs built them; an export, which
    holds no heads, is refused in one line."""
    from framer_dist.analysis import main
    from framer_dist.infer.loading import load_model

    _ok(runs, "S1", "S2")
    tmp = runs["tmp"]
    stage2 = load_model(tmp / "S2" / "checkpoints" / "step_00000002")
    with torch.no_grad():
        trained = _trained_module(tmp)
        z, c = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 16)
        assert torch.equal(stage2(z, c).z_h, trained(z, c).z_h)
    out = tmp_path / "fig"
    common = ["--vae", "", "--max-images", "2", "--max-size", "64", "--timesteps", "300",
              "--config", str(CONFIG), "--out", str(out)]
    assert main(["--checkpoint", f"pix={tmp / 'S1' / 'checkpoints'}",
                 "--checkpoint", f"sem={tmp / 'S2' / 'checkpoints' / 'step_00000002'}", *common]) == 0
    result = json.loads((out / "hierarchy.json").read_text())
    for label in ("pix", "sem"):
        m = result["models"][label]
        assert m["num_blocks"] == 7 and m["teacher_layer"] == 6
        assert len(m["t300"]["cos_lf"]) == 7
    assert result["models"]["pix"]["t300"] != result["models"]["sem"]["t300"]
    assert (out / "layer_similarity.png").is_file() and (out / "faw_fam_weights.png").is_file()
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp / "S2" / "export"), *common]) == 2
    err = capsys.readouterr().err
    assert "needs the FRAMER heads" in err and "Traceback" not in err


@pytest.mark.distributed
def test_heads_get_no_weight_decay_on_every_backend(tmp_path):
    """The alignment heads are a parameter group without weight decay (spec "Heads"): with FRAMER
    weighted 0 they get zero gradients, so under a strong decay they stay bit-identical to their
    init while the LoRA set decays; backend none, FSDP2 with 8-bit AdamW (its sharded optimizer),
    ZeRO-3."""
    from framer_dist.config import load_config
    from framer_dist.models import get_family

    cfg = load_config(str(CONFIG))
    torch.manual_seed(cfg.train.seed)
    init = dict(get_family("pisasr").build(cfg).named_parameters())
    common = ["--config", str(CONFIG), "train.steps=1", "framer.weight=0", "train.weight_decay=10",
              "train.lr=1e-2", "checkpoint.export=[]", "train.global_batch_size=2",
              "log.progress=false"]
    for name, world, extra in (("none", 1, ["data.batch_size=2"]),
                               ("fsdp2", 2, ["--backend", "fsdp2", "data.batch_size=1",
                                             'train.optimizer="adamw8bit"']),
                               ("zero3", 2, [*_ds(tmp_path, 3), "data.batch_size=1"])):
        out = tmp_path / name
        codes = run_ranks([sys.executable, str(TRAIN), *common, *extra, "--out", str(out)], world,
                          tmp_path / f"{name}.log", _env(), bound=HANG_S)
        assert codes == [0] * world, (tmp_path / f"{name}.log").read_text()[-3000:]
        ck = _weights(out / "checkpoints")
        heads = [k for k in ck if k.startswith("framer_heads.")]
        lora_a = [k for k in ck if ".lora_A." in k]
        assert heads and all(torch.equal(ck[k], init[k]) for k in heads), name
        assert all(not torch.equal(ck[k], init[k]) for k in lora_a), name


def test_bf16_ema_8bit_and_stage_2_from_an_export(tmp_path):
    """bf16 autocast, EMA and 8-bit AdamW on the U-Net (backend none): stage 1 writes main and EMA
    LoRA exports; stage 2 started from the EMA export (no heads) carries its pix set and says in one
    line that the heads start fresh; started from stage 1's checkpoint it carries the EMA. The
    frozen pix set reaches stage 2's export in fp32 although train.frozen_bf16 held it in bf16."""
    from safetensors.torch import load_file

    common = ["--config", str(CONFIG), "train.steps=2", 'train.precision="bf16"', "train.ema=true",
              "train.ema_decay=0.5", 'train.optimizer="adamw8bit"', 'checkpoint.export=["lora"]',
              "log.progress=false"]
    p1 = subprocess.run([sys.executable, str(TRAIN), *common, "--out", str(tmp_path / "pix")],
                        env=_env(), capture_output=True, text=True, timeout=HANG_S)
    assert p1.returncode == 0, p1.stderr[-3000:]
    main = load_file(str(tmp_path / "pix" / "export" / "pisasr_lora.safetensors"))
    ema = load_file(str(tmp_path / "pix" / "export" / "ema" / "pisasr_lora.safetensors"))
    assert main.keys() == ema.keys() and any(not torch.equal(main[k], ema[k]) for k in main)
    p2 = subprocess.run([sys.executable, str(TRAIN), *common, 'train.mode="sem"',
                         f"pisasr.init_from={json.dumps(str(tmp_path / 'pix' / 'export' / 'ema'))}",
                         "--out", str(tmp_path / "sem")], env=_env(), capture_output=True,
                        text=True, timeout=HANG_S)
    assert p2.returncode == 0, p2.stderr[-3000:]
    said = [ln for ln in p2.stdout.splitlines() if "holds no FRAMER heads" in ln]
    assert len(said) == 1, p2.stdout[-3000:]
    out = load_file(str(tmp_path / "sem" / "export" / "pisasr_lora.safetensors"))
    pix = [k for k in out if k.split(".")[-2].endswith("_pix")]
    assert pix and all(torch.equal(out[k], ema[k]) for k in pix)  # the frozen pix set: stage 1's EMA
    # from stage 1's checkpoint: both runs keep an EMA, so stage 1's EMA (heads included) carries
    p3 = subprocess.run([sys.executable, str(TRAIN), *common, 'train.mode="sem"',
                         f"pisasr.init_from={json.dumps(str(tmp_path / 'pix' / 'checkpoints'))}",
                         "--out", str(tmp_path / "sem2")], env=_env(), capture_output=True,
                        text=True, timeout=HANG_S)
    assert p3.returncode == 0, p3.stderr[-3000:]
    assert "(its EMA weights)" in p3.stdout and "holds no FRAMER heads" not in p3.stdout
    out = load_file(str(tmp_path / "sem2" / "export" / "pisasr_lora.safetensors"))
    assert all(torch.equal(out[k], ema[k]) for k in pix)
