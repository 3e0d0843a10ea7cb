"""Atomic, resumable checkpoints on top of a parallel Backend.

Layout under the checkpoint root::

    step_00000300/            a complete checkpoint (only ever appears by an atomic rename)
        COMPLETE              marker, written by rank 0 after every rank finished writing
        backend_meta.json     backend, world size, optimizer kind
        client_state.pt       the trainer's state (step, samples consumed, ...)
        rng/rank_00000.pt     each rank's RNG states (torch, CUDA, numpy, python, FRAMER generator)
        ...                   the backend's own files (DeepSpeed tag dir, DCP shards, single file)
    .tmp-step_00000400/       a save in progress (or one killed mid-write: ignored, swept later)
    latest                    text pointer to the newest complete checkpoint (atomic rename, last)

Why not trust DeepSpeed's own `latest`: it is written with a plain write before its final barrier.
Here a checkpoint is valid iff its directory has the final name and the COMPLETE marker, and
`resume="auto"` scans for the newest valid one instead of trusting any pointer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framer_dist.atomic import write_text_atomic
from framer_dist.log import get_logger
from framer_dist.parallel.base import CLIENT_STATE_FILE, Backend
from framer_dist.safe_load import CheckpointLoadError, load_torch

MARKER = "COMPLETE"
LATEST = "latest"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"  # the same prefix as framer_dist.atomic's temporary files


# ----------------------------------------------------------------------------------------------
# RNG


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state this process uses."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.get_state() if generator is not None else None,
    }
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


def derived_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed that depends only on (seed, step, rank): reseeding with it every step makes
    the random stream independent of history, so a resume on another world size is deterministic."""
    h = hashlib.sha256(f"framer_dist:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def seed_rng(seed: int, step: int, rank: int, generator: torch.Generator | None = None) -> None:
    """Seed torch (CPU+CUDA), numpy, python and `generator` from (seed, step, rank)."""
    s = derived_seed(seed, step, rank)
    torch.manual_seed(s)
    np.random.seed(s % (1 << 32))
    random.seed(s)
    if generator is not None:
        generator.manual_seed(derived_seed(seed, step, -1))  # rank-independent: same draw everywhere


# ----------------------------------------------------------------------------------------------
# discovery


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def is_valid_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MARKER).is_file() and not p.name.startswith(TMP_PREFIX)


def list_valid_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and is_valid_checkpoint(p):
            found.append((int(p.name[len(PREFIX):]), p))
    return [p for _, p in sorted(found)]


def find_checkpoint(root: str | Path, spec: str) -> Path | None:
    """The checkpoint ``checkpoint.resume = spec`` names: '' / 'none' -> None; 'auto' -> the newest
    valid checkpoint under ``root`` (None if there is none); else a checkpoint path (or a
    checkpoint root with a ``latest`` pointer) that must be valid; otherwise FileNotFoundError
    saying what the path is instead."""
    if spec in ("", "none"):
        return None
    if spec == "auto":
        valid = list_valid_checkpoints(root)
        return valid[-1] if valid else None
    p = Path(spec)
    if p.is_dir() and not is_valid_checkpoint(p) and (p / LATEST).is_file():
        name = (p / LATEST).read_text().strip()  # a checkpoint root was given
        if not (p / name).exists():
            raise FileNotFoundError(f"config key 'checkpoint.resume': {p / LATEST} names {name}, "
                                    f"which is not in {p}")
        p = p / name
    if not p.exists():
        raise FileNotFoundError(f"config key 'checkpoint.resume': {spec} does not exist")
    if not is_valid_checkpoint(p):
        raise FileNotFoundError(f"config key 'checkpoint.resume': {_not_a_checkpoint(p)}")
    return p


def is_checkpoint_path(path: str | Path) -> bool:
    """A complete checkpoint folder, or a checkpoint root with a ``latest`` pointer (what
    :func:`find_checkpoint` resolves; a family reading another run's checkpoint offline asks)."""
    p = Path(path)
    return is_valid_checkpoint(p) or (p / LATEST).is_file()


def run_config(path: str | Path) -> dict[str, Any]:
    """The config (``Config.to_dict()``) the run that wrote checkpoint ``path`` (a checkpoint
    folder or a root) recorded in its client state, read safely; FileNotFoundError as
    :func:`find_checkpoint`'s, KeyError when the client state records none."""
    step = find_checkpoint(path, str(path))
    return load_torch(step / CLIENT_STATE_FILE)["config"]


def _not_a_checkpoint(p: Path) -> str:
    """What the existing path ``p``, which is no valid checkpoint, is (for the --resume error)."""
    from framer_dist.parallel.base import META_FILE

    newest = "--resume auto takes the newest complete one"
    if not p.is_dir():
        return f"{p} is a file, not a checkpoint folder (step_XXXXXXXX)"
    if p.name.startswith(TMP_PREFIX + PREFIX):  # a save in progress, or one that was stopped
        final = p.name[len(TMP_PREFIX):]
        if (p / MARKER).is_file():
            return (f"{p} is a save that finished writing (it has the {MARKER} marker) but was "
                    f"stopped before its rename to {final}; rename it to {final} to resume from it, "
                    f"or resume from another checkpoint ({newest})")
        return (f"{p} is a save that was stopped while writing (a temporary folder without the "
                f"{MARKER} marker): it cannot be resumed; use a complete checkpoint ({newest})")
    if p.name.startswith(PREFIX) or (p / META_FILE).is_file():
        return (f"{p} is an incomplete checkpoint (no {MARKER} marker: its save did not finish, or "
                f"it is a partial copy); use a complete one ({newest})")
    inside = list_valid_checkpoints(p)
    if inside:
        return (f"{p} holds checkpoints but no '{LATEST}' pointer; name one of them, e.g. "
                f"{inside[-1]}")
    in_run = list_valid_checkpoints(p / "checkpoints")
    if in_run:
        return (f"{p} is a run folder, not a checkpoint; its newest checkpoint is {in_run[-1]} "
                f"(or continue the run with --out {p} --resume auto)")
    return (f"{p} is not a checkpoint folder (no {MARKER} marker, no {META_FILE}, not named "
            f"{PREFIX}XXXXXXXX); checkpoints are the {PREFIX}* folders under <out_dir>/checkpoints")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _broadcast_from_rank0(obj: Any, backend: Backend) -> Any:
    """Rank 0's value on every rank."""
    import torch.distributed as dist

    if backend.world_size == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# the manager


class CheckpointManager:
    """Collective save / resume of a Backend plus the trainer's client state and RNGs.

    Every rank constructs one and calls `save`/`resume` together; the root must be visible to all
    ranks (a shared filesystem on clusters).
    """

    def __init__(self, root: str | Path, backend: Backend, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError("config key 'checkpoint.keep_last' must be >= 1")
        self.root = Path(root)
        self.backend = backend
        self.keep_last = keep_last
        self.last_loaded: Path | None = None
        self.rng_restored_exactly = False

    @classmethod
    def from_config(cls, cfg, backend: Backend) -> "CheckpointManager":
        root = cfg.checkpoint.dir or os.path.join(cfg.train.out_dir, "checkpoints")
        return cls(root, backend, cfg.checkpoint.keep_last)

    # -- save ----------------------------------------------------------------------------------
    def save(self, step: int, client_state: dict[str, Any],
             generator: torch.Generator | None = None) -> Path:
        """Write checkpoint `step` atomically (collective). Returns its final path."""
        be = self.backend
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        # Same step saved twice (e.g. a periodic save, then a preemption save): keep the first.
        if be.agree(is_valid_checkpoint(final)):
            return final
        if be.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # leftover of a killed save of this same step
            tmp.mkdir()
        be.barrier()
        state = dict(client_state)
        state.setdefault("step", step)
        be.save(tmp, state)
        rng_dir = tmp / "rng"
        rng_dir.mkdir(exist_ok=True)
        torch.save(capture_rng(generator), rng_dir / f"rank_{be.rank:05d}.pt")
        be.barrier()  # every rank has finished writing its part
        if be.is_main:
            marker = {"step": step, "world_size": be.world_size, "backend": be.name,
                      "time": time.time()}
            write_text_atomic(tmp / MARKER, json.dumps(marker))
            _fsync_dir(tmp)
            if final.exists():  # an invalid (marker-less) dir can only come from a foreign copy
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            write_text_atomic(self.root / LATEST, final.name + "\n")
            self._prune()
        be.barrier()
        return final

    def _prune(self) -> None:
        """Rank 0: keep the newest `keep_last` valid checkpoints; sweep dead temporary dirs."""
        valid = list_valid_checkpoints(self.root)
        for p in valid[:-self.keep_last]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # -- resume --------------------------------------------------------------------------------
    def find(self, spec: str) -> Path | None:
        """See :func:`find_checkpoint` (under this manager's root)."""
        return find_checkpoint(self.root, spec)

    def resume(self, spec: str, generator: torch.Generator | None = None, seed: int = 0,
               required: tuple[str, ...] = ("step",)) -> dict[str, Any] | None:
        """Load the checkpoint chosen by `spec` (collective). Returns the client state or None;
        a client state without one of the ``required`` keys is a CheckpointLoadError.

        RNGs: on the same world size every rank gets its exact saved state back; on another world
        size they are reseeded from (seed, step, rank) and `rng_restored_exactly` is False.
        """
        be = self.backend
        path = self.find(spec)  # on every rank: a bad path raises everywhere, no hang
        path = _broadcast_from_rank0(path, be)  # "auto": every rank loads rank 0's choice
        if path is None:
            return None
        client = be.load(path)
        lacking = [k for k in required if k not in client]
        if lacking:
            raise CheckpointLoadError(f"{path / CLIENT_STATE_FILE}: the trainer state lacks the "
                                      f"key {lacking[0]!r} (not a framer_dist training checkpoint, "
                                      "or a damaged one)")
        saved_world = json.loads((path / MARKER).read_text())["world_size"]
        rng_file = path / "rng" / f"rank_{be.rank:05d}.pt"
        if saved_world == be.world_size and rng_file.is_file():
            restore_rng(load_torch(rng_file), generator)
            self.rng_restored_exactly = True
        else:
            seed_rng(seed, int(client.get("step", 0)), be.rank, generator)
            self.rng_restored_exactly = False
        self.last_loaded = path
        if spec != "auto":
            self._set_aside_newer(path)
        be.barrier()
        return client

    def _set_aside_newer(self, path: Path) -> None:
        """A resume from an older checkpoint of this root (a rollback) starts a new branch: rank 0
        renames the abandoned branch's newer checkpoints to ``abandoned-<time>-step_...`` (kept on
        disk, invisible to ``auto``, ``keep_last`` and the same-step rule) and points ``latest`` at
        the resumed one. Otherwise this run's saves at those steps would be skipped (the first copy
        of a step is kept) and a later ``--resume auto`` would continue the abandoned branch."""
        if not self.backend.is_main or not self.root.is_dir() \
                or path.parent.resolve() != self.root.resolve():
            return
        at = int(path.name[len(PREFIX):])
        newer = [p for p in list_valid_checkpoints(self.root) if int(p.name[len(PREFIX):]) > at]
        if not newer:
            return
        tag = time.strftime("%Y%m%d%H%M%S")
        for p in newer:
            os.rename(p, self.root / f"abandoned-{tag}-{p.name}")
        _fsync_dir(self.root)
        write_text_atomic(self.root / LATEST, path.name + "\n")
        get_logger().info(f"resumed from {path.name}, older than {newer[-1].name}: the newer "
                          f"checkpoints of {self.root} were renamed to abandoned-{tag}-step_* "
                          "(this run writes its own)")
