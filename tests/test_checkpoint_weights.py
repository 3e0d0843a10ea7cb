"""read_checkpoint_weights: the trained weights of a real checkpoint of every backend, read in this
process (no process group) and compared exactly with what the writing run's backend exported
(``full_trainable_state_dict``, the worker's weights.pt); with ema=True its EMA, compared exactly
with the backend's ``ema_state_dict()`` (the worker's ema.pt); bad input in one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parallel_launch import launch, tail  # noqa: E402
from _tiny_parallel import make_model  # noqa: E402

from framer_dist.parallel import read_checkpoint_weights  # noqa: E402
from framer_dist.parallel.names import strip_wrapper_prefixes  # noqa: E402
from framer_dist.safe_load import CheckpointLoadError  # noqa: E402

STEPS = 2
STEP_DIR = f"step_{STEPS:08d}"
# name -> the worker phase; every phase saves at its last step, whose weights.pt it also writes.
# bf16 where the backend keeps fp32 masters apart from bf16 compute weights (DeepSpeed's module
# file, FSDP2's unsharded params): the reader must return the masters. The main phases keep an EMA
# (train.ema, decay 0.5: it lags the weights after 2 steps), which the weights reader must pass
# over; a *_noema phase per backend is a run without one
PHASES = {
    "none": {"backend": "none", "ema": True},
    "fsdp2": {"backend": "fsdp2", "precision": "bf16", "ema": True},
    "zero3": {"backend": "deepspeed", "stage": 3, "precision": "bf16", "ema": True},
    "zero2": {"backend": "deepspeed", "stage": 2, "precision": "bf16", "mode": "full", "ema": True},
    "zero1": {"backend": "deepspeed", "stage": 1, "precision": "bf16", "ema": True},
    "none_noema": {"backend": "none"},
    "fsdp2_noema": {"backend": "fsdp2", "precision": "bf16"},
    "zero1_noema": {"backend": "deepspeed", "stage": 1, "precision": "bf16"},
}
LAUNCH = {"fsdp2": ["fsdp2", "fsdp2_noema"],  # one 2-rank launch per backend
          "deepspeed": ["zero3", "zero2", "zero1", "zero1_noema"]}
IN_PROCESS = ("none", "none_noema")
WITH_EMA = [n for n, ph in PHASES.items() if ph.get("ema")]
DIST = pytest.mark.distributed


def _params(names: list[str]) -> list:
    return [pytest.param(n, marks=() if n in IN_PROCESS else DIST) for n in names]


def _phase(name: str) -> dict:
    return {**PHASES[name], "name": name, "steps": STEPS, "ckpt": f"ck_{name}", "every": STEPS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Lazily: the `none` run in this process, each distributed backend in one 2-rank launch."""
    out = tmp_path_factory.mktemp("ckweights")
    done: set[str] = set()

    def get(name: str) -> Path:
        if name in IN_PROCESS and name not in done:
            import _parallel_worker as w
            w.run_phase(out, _phase(name))
            done.add(name)
        for group, names in LAUNCH.items():
            if name in names and name not in done:
                d = out / f"launch_{group}"
                rc = launch(2, d, [_phase(n) for n in names])
                assert rc == [0, 0], tail(d)
                for n in names:
                    (out / n).symlink_to(d / n)
                    (out / f"ck_{n}").symlink_to(d / f"ck_{n}")
                done.update(names)
        return out

    return get


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg


@pytest.mark.parametrize("name", _params(list(PHASES)))
def test_reads_the_trained_weights_exactly(runs, name):
    out = runs(name)
    ckpt = out / f"ck_{name}" / STEP_DIR
    trained = torch.load(out / name / "weights.pt", weights_only=True)
    sd = read_checkpoint_weights(ckpt)
    assert not torch.distributed.is_initialized()  # one process, no group
    assert list(sd) == list(trained), (list(sd), list(trained))  # same names, model order
    for k, v in trained.items():
        assert sd[k].dtype == torch.float32 and sd[k].device.type == "cpu", (k, sd[k].dtype)
        assert torch.equal(sd[k], v), f"{name}: {k} differs by {(sd[k] - v).abs().max()}"
    # loads into a freshly built plain model under its own names
    model, _ = make_model(1, PHASES[name].get("mode", "control"))
    res = model.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys and len(res.missing_keys) == len(model.state_dict()) - len(sd)
    # a subset, in the order asked; a name the checkpoint lacks is named
    some = sorted(trained)[::-2][:2]
    sub = read_checkpoint_weights(str(ckpt), some)
    assert list(sub) == some and all(torch.equal(sub[k], trained[k]) for k in some)
    absent = "transformer_blocks.0.nope.weight" if name == "zero2" else "transformer_blocks.0.base.weight"
    with pytest.raises(CheckpointLoadError) as e:
        read_checkpoint_weights(ckpt, [some[0], absent])
    _one_line(e, str(ckpt), repr(absent))


@pytest.mark.parametrize("name", _params(WITH_EMA))
def test_reads_the_ema_exactly(runs, name):
    """ema=True: the backend's own full EMA (``ema_state_dict()`` right after the save, the
    worker's ema.pt), exactly, under the weights' names and shapes; not the weights."""
    out = runs(name)
    ckpt = out / f"ck_{name}" / STEP_DIR
    ema = torch.load(out / name / "ema.pt", weights_only=True)
    trained = torch.load(out / name / "weights.pt", weights_only=True)
    sd = read_checkpoint_weights(ckpt, ema=True)
    assert not torch.distributed.is_initialized()
    assert list(sd) == list(ema) == list(trained), (list(sd), list(ema))
    for k, v in ema.items():
        assert sd[k].dtype == torch.float32 and sd[k].device.type == "cpu", (k, sd[k].dtype)
        assert sd[k].shape == trained[k].shape, (k, sd[k].shape, trained[k].shape)
        assert torch.equal(sd[k], v), f"{name}: EMA {k} differs by {(sd[k] - v).abs().max()}"
    lagging = [k for k in sd if not torch.equal(sd[k], trained[k])]
    assert len(lagging) == len(sd), f"{name}: EMA equals the weights for {set(sd) - set(lagging)}"
    # a subset, in the order asked; the root through its latest; a name the checkpoint lacks
    some = sorted(ema)[::-2][:2]
    sub = read_checkpoint_weights(ckpt, some, ema=True)
    assert list(sub) == some and all(torch.equal(sub[k], ema[k]) for k in some)
    root = read_checkpoint_weights(ckpt.parent, ema=True)
    assert list(root) == list(ema) and all(torch.equal(root[k], ema[k]) for k in ema)
    with pytest.raises(CheckpointLoadError) as e:
        read_checkpoint_weights(ckpt, [some[0], "transformer_blocks.0.nope.weight"], ema=True)
    _one_line(e, str(ckpt), "'transformer_blocks.0.nope.weight'")


@pytest.mark.parametrize("name", _params([n for n in PHASES if n not in WITH_EMA]))
def test_ema_of_a_run_without_ema_is_one_line(runs, name):
    out = runs(name)
    ckpt = out / f"ck_{name}" / STEP_DIR
    assert not (out / name / "ema.pt").exists()  # the writing backend had no EMA to export
    for names in (None, ["transformer_blocks.0.control.weight"]):
        with pytest.raises(CheckpointLoadError) as e:
            read_checkpoint_weights(ckpt, names, ema=True)
        _one_line(e, str(ckpt), "had no EMA (train.ema = false)")


@DIST
def test_zero3_ema_partitions_of_any_world_size(runs, tmp_path):
    """ZeRO-3 keeps each rank's flat fp32 partition (``ema_rank<r>.pt``): the reader puts the
    checkpoint's ``world_size`` of them together. The 2-rank EMA re-cut as a 3-rank run lays it
    out (ceil(numel / 3) values per rank, the last end-padded: DeepSpeed's partitioning, which the
    backend's own resume re-slices in the same way) reads back the same; a lost rank file, or
    partitions that do not fit the shapes, is a one-line error."""
    out = runs("zero3")
    ema = torch.load(out / "zero3" / "ema.pt", weights_only=True)
    src = out / "ck_zero3" / STEP_DIR
    c = tmp_path / "w3" / STEP_DIR
    shutil.copytree(src, c)
    saved = {n: torch.load(f, weights_only=True) for n, f in
             ((f.name, f) for f in sorted(src.glob("ema_rank*.pt")))}
    assert list(saved) == ["ema_rank00000.pt", "ema_rank00001.pt"]
    names = list(saved["ema_rank00000.pt"])
    for f in c.glob("ema_rank*.pt"):
        f.unlink()
    world = 3
    for r in range(world):
        part = {}
        for n in names:
            flat = ema[strip_wrapper_prefixes(n)].reshape(-1)
            size = -(-flat.numel() // world)
            padded = torch.nn.functional.pad(flat, (0, size * world - flat.numel()))
            part[n] = padded[r * size:(r + 1) * size].clone()
        torch.save(part, c / f"ema_rank{r:05d}.pt")
    assert any(ema[n].numel() % world for n in ema)  # the padding is cut off
    meta = json.loads((c / "backend_meta.json").read_text())
    (c / "backend_meta.json").write_text(json.dumps({**meta, "world_size": world}))
    sd = read_checkpoint_weights(c, ema=True)
    assert list(sd) == list(ema) and all(torch.equal(sd[k], ema[k]) for k in ema)
    # the same files read as a 2-rank checkpoint: too few values for the shapes
    (c / "backend_meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointLoadError) as e:
        read_checkpoint_weights(c, ema=True)
    _one_line(e, str(c), "not a readable DeepSpeed EMA", "partitions of")
    (c / "backend_meta.json").write_text(json.dumps({**meta, "world_size": world}))
    (c / "ema_rank00002.pt").unlink()
    with pytest.raises(CheckpointLoadError) as e:
        read_checkpoint_weights(c, ema=True)
    _one_line(e, str(c / "ema_rank00002.pt"), "missing")


def test_not_a_checkpoint_is_one_line(tmp_path):
    cases = {tmp_path / "missing": "no such checkpoint folder",
             tmp_path: "not a checkpoint folder"}
    (tmp_path / "file.pt").write_bytes(b"x")
    cases[tmp_path / "file.pt"] = "is a file"
    (tmp_path / "step_00000001").mkdir()  # a save that did not finish: no COMPLETE marker
    cases[tmp_path / "step_00000001"] = "no COMPLETE marker"
    for p, what in cases.items():
        with pytest.raises(CheckpointLoadError) as e:
            read_checkpoint_weights(p)
        _one_line(e, str(p), what)
    c = tmp_path / "step_00000002"
    c.mkdir()
    (c / "COMPLETE").write_text("{}")
    with pytest.raises(CheckpointLoadError) as e:
        read_checkpoint_weights(c)
    _one_line(e, str(c / "backend_meta.json"), "missing")
    (c / "backend_meta.json").write_text(json.dumps({"backend": "ddp", "world_size": 2}))
    with pytest.raises(CheckpointLoadError) as e:
        read_checkpoint_weights(c)
    _one_line(e, str(c / "backend_meta.json"), "unknown backend 'ddp'")


def test_checkpoint_root_reads_its_latest(runs, tmp_path):
    root = runs("none") / "ck_none"
    sd, step = read_checkpoint_weights(root), read_checkpoint_weights(root / STEP_DIR)
    assert list(sd) == list(step) and all(torch.equal(sd[k], step[k]) for k in sd)
    (tmp_path / "latest").write_text("step_00000009")
    with pytest.raises(CheckpointLoadError) as e:
        read_checkpoint_weights(tmp_path)
    _one_line(e, str(tmp_path / "latest"), "step_00000009")


def test_broken_file_is_one_line(runs, tmp_path):
    c = tmp_path / STEP_DIR
    shutil.copytree(runs("none") / "ck_none" / STEP_DIR, c)
    (c / "single_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointLoadError) as e:
        read_checkpoint_weights(c)
    _one_line(e, str(c / "single_state.pt"), "not a readable torch file")


@pytest.mark.parametrize("name", _params(WITH_EMA))
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # plant_dcp_entry's dcp.save
def test_planted_pickle_runs_nothing(runs, tmp_path, name):
    """A payload planted beside the real contents of each pickle the reader opens (for the
    weights, and with ema=True for the EMA) is refused in one line naming the file; the code
    never runs. (FSDP2: a payload among the optimizer's entries of the shards is never read at
    all.)"""
    from test_checkpoint_safety import plant, plant_dcp_entry

    from framer_dist.parallel.deepspeed.backend import DeepSpeedBackend

    src = runs(name) / f"ck_{name}" / STEP_DIR
    files = [*src.glob("single_state.pt"), *src.glob("dcp/.metadata"), *sorted(src.glob("ds/*.pt"))]
    assert len(files) == {"none": 1, "fsdp2": 1, "zero3": 4, "zero2": 3, "zero1": 3}[name], files
    ema_files = [*src.glob("single_state.pt"), *src.glob("dcp/.metadata"), *sorted(src.glob("ema_*.pt")),
                 *([DeepSpeedBackend._mp_rank_file(src)] if name == "zero3" else [])]  # its shapes
    assert len(ema_files) == {"none": 1, "fsdp2": 1, "zero3": 3, "zero2": 1, "zero1": 1}[name], ema_files
    cases = [(f, False) for f in files] + [(f, True) for f in ema_files]
    for i, (f, ema) in enumerate(cases):
        c = tmp_path / str(i) / STEP_DIR
        shutil.copytree(src, c)
        marker = tmp_path / f"ran_{i}"
        plant(c / f.relative_to(src), marker)
        with pytest.raises(CheckpointLoadError) as e:
            read_checkpoint_weights(c, ema=ema)
        assert not marker.exists(), f"reading {f.name} (ema={ema}) ran the planted code"
        _one_line(e, str(c), "refused to load", ".system object")
    if name == "fsdp2":
        c = tmp_path / "entry" / STEP_DIR
        shutil.copytree(src, c)
        plant_dcp_entry(c / "dcp", tmp_path / "ran_entry")
        for ema in (False, True):
            sd = read_checkpoint_weights(c, ema=ema)
            assert set(sd) == set(read_checkpoint_weights(src, ema=ema))
        assert not (tmp_path / "ran_entry").exists()


@DIST
def test_incomplete_deepspeed_files_are_one_line(runs, tmp_path):
    c = tmp_path / STEP_DIR
    shutil.copytree(runs("zero3") / "ck_zero3" / STEP_DIR, c)
    for f in (c / "ds").glob("*rank_1*optim_states.pt"):  # rank 1's partition lost
        f.unlink()
    with pytest.raises(CheckpointLoadError) as e:
        read_checkpoint_weights(c)
    _one_line(e, str(c / "ds"), "not a readable DeepSpeed ZeRO checkpoint")
