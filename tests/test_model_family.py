"""The model-family seam: a toy family defined outside framer_dist/models/ (tests/_toy_family.py)
trains with FRAMER through the normal command line on backend none and on FSDP2 (2 ranks,
activation checkpointing), and the two agree; config keys are checked against the family."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from framer_dist.config import ConfigError, load_config
from framer_dist.models import get_family

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TRAIN = REPO / "framer_dist" / "train.py"
TOY = ['model.family="_toy_family:FAMILY"', 'model.preset="toy"', 'train.mode="all"']
ARGS = ["--config", str(REPO / "configs" / "tiny_cpu_demo.toml"), *TOY, 'data.source="synthetic"',
        "data.resolution=32", "train.global_batch_size=4", "data.batch_size=2", "train.steps=4",
        "log.every=1", "log.heatmap_every=2", "log.val_every=1", "log.progress=false",
        "checkpoint.every=2", "checkpoint.export=[]", "framer.random_negatives=false"]
sys.path.insert(0, str(TESTS))
from _ranks import run_ranks  # noqa: E402
from _waiting import HANG_S as HANG  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", FRAMER_NO_PROGRESS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), **extra)


def _losses(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _toy_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def test_family_keys_are_checked_against_the_family():
    cfg = load_config(None, TOY)
    assert get_family(cfg.model.family).name == "toy"
    with pytest.raises(ConfigError, match=r"'model.preset': 'tiny' is not a toy preset; allowed values: 'toy'"):
        load_config(None, ['model.family="_toy_family:FAMILY"'])
    with pytest.raises(ConfigError, match=r"'checkpoint.export': 'control' is not an export of the toy"):
        load_config(None, [*TOY, 'checkpoint.export=["control"]'])
    with pytest.raises(ConfigError, match=r"'model.family': cannot import '_nope:FAMILY'"):
        load_config(None, ['model.family="_nope:FAMILY"'])
    assert get_family("dit4sr").modes == ("control", "lora", "full")


def test_zero3_leaf_classes_are_the_family_blocks(tmp_path):
    """ZeRO-3 fetch units come from the model being wrapped, not from the shipped JSON: the toy's
    and DiT4SR's blocks, each matched by DeepSpeed's own leaf-module rule; a JSON that names its
    own leaf_module keeps it; ZeRO-2 gets none."""
    from deepspeed.runtime.zero.leaf_module_config import DeepSpeedZeroLeafModuleConfig
    from deepspeed.utils.z3_leaf_module import apply_zero_leaf_module_config

    from framer_dist.models.dit4sr import build_model
    from framer_dist.parallel.base import BackendConfig
    from framer_dist.parallel.blocks import block_classes
    from framer_dist.parallel.deepspeed.config import build_ds_config

    def built(model, json_path: Path, *over: str) -> dict:
        cfg = load_config(None, [*over, "parallel.backend='deepspeed'", f"parallel.ds_config='{json_path}'"])
        return build_ds_config(BackendConfig.from_config(cfg), 1, 1, block_classes(model))["zero_optimization"]

    toy = get_family("_toy_family:FAMILY").build(load_config(None, TOY))
    dit = build_model(load_config(None, []).model)  # the tiny preset
    for model, blocks, want in ((toy, toy.blocks, "_toy_family.ToyBlock"),
                                (dit, dit.transformer_blocks, "framer_dist.models.dit4sr.block.DiT4SRBlock")):
        for shipped in ("zero3", "zero3_offload"):
            zero = built(model, REPO / "ds_configs" / f"{shipped}.json", *(TOY if model is toy else ()))
            assert zero["leaf_module"] == {"classes": [want]}
        leaves = apply_zero_leaf_module_config(model, DeepSpeedZeroLeafModuleConfig(**zero["leaf_module"]))
        assert leaves == list(blocks)  # DeepSpeed matches exactly the blocks
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3, "leaf_module": {"classes": []}}}))
    assert built(toy, own, *TOY)["leaf_module"] == {"classes": []}
    assert "leaf_module" not in built(toy, REPO / "ds_configs" / "zero2.json", *TOY)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_family_from_outside_the_package_trains_on_none_and_fsdp2(tmp_path):
    single = tmp_path / "none"
    p = subprocess.run([sys.executable, str(TRAIN), *ARGS, f"train.out_dir={json.dumps(str(single))}"],
                       env=_env(), capture_output=True, text=True, timeout=HANG)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    fsdp = tmp_path / "fsdp2"
    # the same global batch of 4 in forwards of 2 images (InterCL compares within a forward):
    # micro 2 x accumulation 2 on one process, micro 1 x 2 ranks x accumulation 2 here
    args = [str(TRAIN), *ARGS, "--backend", "fsdp2", 'parallel.activation_checkpointing="all"',
            "data.batch_size=1", f"train.out_dir={json.dumps(str(fsdp))}"]
    codes = run_ranks([sys.executable, *args], 2, tmp_path / "fsdp2.log", _env())
    assert codes == [0, 0], (tmp_path / "fsdp2.log").read_text()[-3000:]

    a, b = _losses(single), _losses(fsdp)
    assert [r["step"] for r in a] == [1, 2, 3, 4] == [r["step"] for r in b]
    for ra, rb in zip(a, b):  # the family's loss name, FRAMER on, and 2 ranks == 1 process
        assert set(ra) >= {"loss/mse", "loss/framer", "loss/total"} and "loss/noise" not in ra
        for k in ("loss/mse", "loss/framer", "loss/total", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    for out in (single, fsdp):
        assert (out / "checkpoints" / "step_00000004" / "COMPLETE").is_file()


LEGACY = TESTS / "data" / "legacy_dit4sr"  # written by commit c2fa02b: its metadata names no family
LEGACY_ARGS = ["--config", str(REPO / "configs" / "tiny_cpu_demo.toml"), 'data.source="synthetic"',
               "data.resolution=32", "log.val_every=0", "log.heatmap_every=0", "log.progress=false",
               'checkpoint.export=["control"]']


@pytest.mark.slow
def test_checkpoints_and_exports_from_before_the_seam_load_as_dit4sr(tmp_path):
    """A checkpoint and a control export written before model families existed resume and load
    as dit4sr: the resumed step equals an uninterrupted run's; another family is refused."""
    import torch
    from safetensors.torch import load_file

    from framer_dist.models.dit4sr import build_model, load_control

    meta = json.loads((LEGACY / "step_00000001" / "backend_meta.json").read_text())
    assert "family" not in meta and "format" not in meta
    ckpt = tmp_path / "step_00000001"
    import shutil
    shutil.copytree(LEGACY / "step_00000001", ckpt)

    def run(out: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(TRAIN), *LEGACY_ARGS, "train.steps=2",
                               f"train.out_dir={json.dumps(str(tmp_path / out))}", *extra],
                              env=_env(), capture_output=True, text=True, timeout=HANG)

    resumed = run("resumed", "--resume", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fresh = run("fresh")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (last,) = [r for r in _losses(tmp_path / "resumed") if r["step"] == 2]
    assert last == [r for r in _losses(tmp_path / "fresh") if r["step"] == 2][0]
    other = run("other", "--resume", str(ckpt), *TOY, "checkpoint.export=[]")
    errors = [ln for ln in other.stderr.splitlines() if ln.startswith("framer-train: error:")]
    assert other.returncode == 2 and len(errors) == 1 and \
        "holds a 'dit4sr' model, this run trains model.family='_toy_family:FAMILY'" in errors[0]

    model = build_model(load_config(str(REPO / "configs" / "tiny_cpu_demo.toml")).model)
    load_control(model, LEGACY / "dit4sr_control.safetensors")
    saved = load_file(str(LEGACY / "dit4sr_control.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
