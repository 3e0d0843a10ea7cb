"""Loading a checkpoint never runs code from it (framer_dist.safe_load).

A real checkpoint of each backend (none; FSDP2; DeepSpeed ZeRO-3 on 1 rank; ZeRO-3 on 2 ranks
resumed on 1, through DeepSpeed's universal conversion) gets a crafted pickle planted in each of
its pickle-bearing files in turn, keeping the file's real contents beside the payload (as an
attacker sharing a working checkpoint would). Resuming each copy with the real trainer must run
nothing (the payload would create a marker file) and refuse with one line naming the file and the
type; the untouched copy must resume and train.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framer_dist.checkpoint import CheckpointManager
from framer_dist.config import load_config
from framer_dist.parallel import setup_backend
from framer_dist.parallel.base import META_FILE, Backend, meta_mismatch
from framer_dist.safe_load import (FORMAT_VERSION, CheckpointLoadError, load_torch,
                                   read_dcp_metadata)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ranks import rank_env, run_ranks  # noqa: E402
from _tiny_parallel import make_model  # noqa: E402
from _waiting import HANG_S as HANG  # noqa: E402
from _waiting import wait_exit  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "framer_dist" / "train.py"
WORKER = REPO / "tests" / "_resume_worker.py"
ARGS = ["--config", str(REPO / "configs" / "tiny_cpu_demo.toml"), 'data.source="synthetic"',
        "data.resolution=32", "train.ema=true", "checkpoint.every=1", "checkpoint.export=[]",
        "log.every=1", "log.heatmap_every=0", "log.val_every=0", "log.progress=false"]


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def plant(file: Path, marker: Path) -> None:
    """Add a payload to ``file``, keeping its real contents (the test's own trusted load)."""
    if file.name == ".metadata":  # DCP: a pickled Metadata dataclass
        with open(file, "rb") as fh:
            md = pickle.load(fh)
        md.planner_data = Payload(marker)
        with open(file, "wb") as fh:
            pickle.dump(md, fh)
        return
    obj = torch.load(file, map_location="cpu", weights_only=False)
    obj = {**obj, "planted": Payload(marker)} if isinstance(obj, dict) else (obj, Payload(marker))
    torch.save(obj, file)


def plant_dcp_entry(dcp_dir: Path, marker: Path) -> None:
    """Rewrite a DCP checkpoint with a payload as one of its non-tensor entries (the optimizer's
    learning rate, stored as pickled bytes inside a .distcp file)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = dcp_dir.parent / "flat.pt"
    dcp_to_torch_save(dcp_dir, flat)
    sd = torch.load(flat, weights_only=False)
    flat.unlink()
    sd["optim"]["param_groups"][0]["lr"] = Payload(marker)
    shutil.rmtree(dcp_dir)
    dcp.save(sd, checkpoint_id=str(dcp_dir), no_dist=True)


def _env(rank: int, world: int, port: int | None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", FRAMER_NO_PROGRESS="1",
               PYTHONPATH=str(REPO))
    return env if port is None else rank_env(env, rank, world, port)


def _run(args: list[str], world: int, distributed: bool, log: Path) -> None:
    """Ranks 0..world-1 of ``args`` (train.py or the worker) with the env torchrun sets."""
    if distributed:
        codes = run_ranks([sys.executable, *args], world, log, _env(0, 1, None))
    else:
        with open(log, "w") as fh:
            p = subprocess.Popen([sys.executable, *args], env=_env(0, 1, None), stdout=fh,
                                 stderr=subprocess.STDOUT)
            codes = [wait_exit(p, f"{Path(args[0]).name} to exit",
                               details=lambda: log.read_text()[-4000:])]
    assert codes == [0] * world, f"{args[0]} exited {codes}:\n{log.read_text()[-4000:]}"


def _backend_args(backend: str, tmp: Path) -> list[str]:
    if backend == "deepspeed":
        ds = tmp / "zero3.json"  # tiny params really partitioned: threshold 0; blocks as leaves
        ds.write_text(json.dumps({"zero_optimization": {  # no leaf_module: the blocks are leaves
            "stage": 3, "stage3_param_persistence_threshold": 0}}))
        return ["--ds", str(ds)]
    return ["--backend", backend]


def _pickle_files(ckpt: Path) -> list[Path]:
    """Every file of a checkpoint that is unpickled on resume (all but JSON, text and the
    DeepSpeed helper scripts it copies in, which nothing runs)."""
    skip = {".json", ".py", ".distcp", ""}
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.suffix not in skip
                  and p.name not in ("latest",)) + sorted(ckpt.rglob(".metadata"))


def _resume_all(tmp: Path, backend: str, ckpts: list[Path], name: str) -> list[dict]:
    spec = tmp / f"{name}.json"
    result = tmp / f"{name}_result.json"
    runs = [[str(c), str(tmp / "out" / f"{name}_{i}")] for i, c in enumerate(ckpts)]
    spec.write_text(json.dumps({"argv": [*ARGS, *_backend_args(backend, tmp), "train.steps=3"],
                                "runs": runs, "result": str(result)}))
    _run([str(WORKER), str(spec)], 1, backend != "none", tmp / f"{name}.log")
    return json.loads(result.read_text())


def _planted_copies(tmp: Path, src: Path, name: str, files: list[Path]) -> list[tuple[Path, Path, str]]:
    """One copy of checkpoint ``src`` per file, with that file planted: (copy, marker, what)."""
    out = []
    (tmp / "markers").mkdir(exist_ok=True)  # a payload that runs can create its marker
    for i, f in enumerate(files):
        rel = f.relative_to(src)
        dst = tmp / "planted" / f"{name}_{i}" / src.name
        shutil.copytree(src, dst)
        marker = tmp / "markers" / f"{name}_{i}"
        if rel.suffix == ".distcp":
            plant_dcp_entry(dst / rel.parent, marker)
        else:
            plant(dst / rel, marker)
        out.append((dst, marker, str(rel)))
    return out


def _check(results: list[dict], planted: list[tuple[Path, Path, str]]) -> None:
    control, rest = results[0], results[1:]
    assert control["rc"] == 0 and not control["escaped"], control
    assert len(rest) == len(planted)
    for res, (ckpt, marker, what) in zip(rest, planted):
        assert not marker.exists(), f"loading {what} ran the planted code"
        assert res["rc"] == 2 and not res["escaped"] and res["tracebacks"] == 0, (what, res)
        assert len(res["errors"]) == 1, (what, res)
        line = res["errors"][0]
        assert "refused to load" in line and ".system object" in line, (what, line)
        assert str(ckpt) in line, (what, line)  # names the file (or the DCP entry)


def _make_checkpoint(tmp: Path, backend: str, world: int) -> Path:
    out = tmp / f"train_{backend}_{world}"
    args = [str(TRAIN), *ARGS, *_backend_args(backend, tmp), "train.steps=2",
            f"train.out_dir={json.dumps(str(out))}"]
    _run(args, world, backend != "none", tmp / f"train_{backend}_{world}.log")
    return out / "checkpoints" / "step_00000002"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["none", pytest.param("fsdp2", marks=pytest.mark.distributed),
                                     pytest.param("deepspeed", marks=pytest.mark.distributed)])
def test_planted_pickle_in_any_file_is_refused(tmp_path, backend):
    src = _make_checkpoint(tmp_path, backend, 1)
    files = _pickle_files(src)
    if backend == "fsdp2":
        files += sorted((src / "dcp").glob("*.distcp"))  # the non-tensor entries inside
    kinds = {f.name for f in files}
    expected = {"none": {"client_state.pt", "single_state.pt", "rank_00000.pt"},
                "fsdp2": {"client_state.pt", "fsdp_extra.pt", "rank_00000.pt", ".metadata",
                          "__0_0.distcp"},
                "deepspeed": {"client_state.pt", "rank_00000.pt", "ema_rank00000.pt",
                              "zero_pp_rank_0_mp_rank_00_model_states.pt",
                              "zero_pp_rank_0_mp_rank_00_optim_states.pt"}}[backend]
    assert kinds == expected, kinds  # a new pickle-bearing file needs a look (and a test)
    planted = _planted_copies(tmp_path, src, backend, files)
    results = _resume_all(tmp_path, backend, [src, *(p for p, _, _ in planted)], backend)
    _check(results, planted)


@pytest.mark.slow
@pytest.mark.distributed
def test_planted_pickle_is_refused_on_zero3_world_size_change(tmp_path):
    """2 ranks -> 1: DeepSpeed's universal conversion reads every rank's files, and the converted
    checkpoint it leaves inside the checkpoint folder is read by its universal loader: both with
    weights_only=False inside DeepSpeed. A planted file in either is refused."""
    src = _make_checkpoint(tmp_path, "deepspeed", 2)
    files = [f for f in _pickle_files(src) if f.parent.name != "rng"]  # rng: reseeded on 1 rank
    assert {f.name for f in files} == {
        "client_state.pt", "ema_rank00000.pt", "ema_rank00001.pt",
        *(f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim"))}
    planted = _planted_copies(tmp_path, src, "z3", files)
    control = tmp_path / "control" / src.name
    shutil.copytree(src, control)
    _check(_resume_all(tmp_path, "deepspeed", [control, *(p for p, _, _ in planted)], "z3"), planted)

    # the control resume left its universal conversion in the checkpoint: plant into one file of
    # each kind that a 1-rank resume reads there (the conversion is reused, not redone)
    conv = sorted(f for f in (control / "ds_universal").rglob("*.pt") if "pp_rank_1" not in f.name)
    by_kind = {}
    for f in conv:
        by_kind.setdefault(f.name if f.parent.parent.name != "zero" else "param/" + f.name, f)
    assert set(by_kind) >= {"optimizer_state.pt", "param/fp32.pt", "param/exp_avg.pt",
                            "zero_pp_rank_0_mp_rank_00_model_states.pt"}, sorted(by_kind)
    planted = _planted_copies(tmp_path, control, "uni", sorted(by_kind.values()))
    fresh = tmp_path / "control2" / src.name
    shutil.copytree(control, fresh)
    _check(_resume_all(tmp_path, "deepspeed", [fresh, *(p for p, _, _ in planted)], "uni"), planted)


@pytest.mark.slow
def test_refusal_is_one_line_on_the_command_line(tmp_path):
    """The refusal as a user sees it: exit 2, one ``framer-train: error:`` line, no traceback."""
    src = _make_checkpoint(tmp_path, "none", 1)
    marker = tmp_path / "ran"
    plant(src / "client_state.pt", marker)
    p = subprocess.run([sys.executable, str(TRAIN), *ARGS, "train.steps=3", "--resume", str(src),
                        f"train.out_dir={json.dumps(str(tmp_path / 'again'))}"],
                       env=_env(0, 1, None), capture_output=True, text=True, timeout=HANG)
    assert p.returncode == 2, p.stderr[-3000:]
    assert not marker.exists()
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("framer-train: error:")]
    assert errors == [f"framer-train: error: {src / 'client_state.pt'}: refused to load: it holds "
                      "a posix.system object, which is not on the list of types a checkpoint may "
                      "contain (unpickling it could run code from the file; framer_dist never "
                      "writes one)"], p.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# the loaders alone


def test_load_torch_refuses_and_names_file_and_type(tmp_path):
    marker = tmp_path / "ran"
    f = tmp_path / "state.pt"
    torch.save({"step": 3, "x": Payload(marker)}, f)
    with pytest.raises(CheckpointLoadError) as e:
        load_torch(f)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{f}: refused to load: it holds a posix.system")
    # a plain pickle (not a torch zip file) is refused too
    f.write_bytes(pickle.dumps({"x": Payload(marker)}))
    with pytest.raises(CheckpointLoadError, match=f"^{f}: refused to load: "):
        load_torch(f)
    assert not marker.exists()
    # garbage and a missing file: one line naming the file
    f.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointLoadError, match=f"^{f}: "):
        load_torch(f)
    with pytest.raises(CheckpointLoadError, match="missing"):
        load_torch(tmp_path / "nope.pt")
    # what our checkpoints hold loads: tensors, containers, numpy RNG state
    import numpy as np
    state = {"t": torch.ones(2), "rng": np.random.get_state(), "n": [1, 2.0, "a", None]}
    torch.save(state, f)
    back = load_torch(f)
    assert torch.equal(back["t"], state["t"]) and (back["rng"][1] == state["rng"][1]).all()


def test_dcp_metadata_reader_refuses_other_types(tmp_path):
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "dcp"
    dcp.save({"w": torch.ones(3), "lr": 0.5}, checkpoint_id=str(d), no_dist=True)
    md = read_dcp_metadata(d / ".metadata")
    assert set(md.state_dict_metadata) == {"w", "lr"}
    marker = tmp_path / "ran"
    plant(d / ".metadata", marker)
    with pytest.raises(CheckpointLoadError, match=r"\.metadata: refused to load: it holds a posix\.system"):
        read_dcp_metadata(d / ".metadata")
    assert not marker.exists()


def _single_backend():
    cfg = load_config(None, ["train.precision='fp32'"])
    model, params = make_model(0)
    return setup_backend(cfg, model, params)


def test_client_state_without_a_key_and_a_newer_format_are_one_line(tmp_path):
    be = _single_backend()
    mgr = CheckpointManager(tmp_path / "ck", be)
    path = mgr.save(1, {"step": 1})  # no samples_seen
    meta = json.loads((path / META_FILE).read_text())
    assert meta["format"] == FORMAT_VERSION
    with pytest.raises(CheckpointLoadError) as e:
        CheckpointManager(tmp_path / "ck", _single_backend()).resume(
            str(path), required=("step", "samples_seen"))
    assert str(e.value) == (f"{path / 'client_state.pt'}: the trainer state lacks the key "
                            "'samples_seen' (not a framer_dist training checkpoint, or a damaged one)")
    # a checkpoint from a newer layout is refused by number, up front and at load
    meta["format"] = FORMAT_VERSION + 1
    (path / META_FILE).write_text(json.dumps(meta))
    problem = meta_mismatch(Backend.read_meta(path), path, "none", "adamw")
    assert problem and "layout version" in problem and "\n" not in problem
    with pytest.raises(RuntimeError, match="layout version"):
        _single_backend().load(path)
    # an older checkpoint without the number is the same layout as version 1
    del meta["format"]
    (path / META_FILE).write_text(json.dumps(meta))
    assert meta_mismatch(meta, path, "none", "adamw") is None
