"""The trained weights of a complete checkpoint, read in one process: no process group, no engine,
no optimizer, whatever backend and world size wrote it (e.g. a run with another trainable set
that starts from a finished one, as PiSA-SR's stage 2 starts from stage 1).

Where each backend keeps them (``backend_meta.json`` says which one wrote the checkpoint):

* ``none``: ``single_state.pt``, entry ``model``: the trainable parameters by name, as trained
  (in one process the parameters are their own fp32 masters).
* ``fsdp2``: the DCP folder ``dcp/``, entries ``model.<name>``: each rank's fp32 shards of the
  trainable parameters; DCP reassembles them from its ``.metadata`` for any world size. (The
  ``optim.*`` and ``ema.*`` entries beside them are not read.)
* ``deepspeed``: DeepSpeed's tag folder ``ds/``. Its module file holds the compute-dtype weights
  (bf16 under bf16, nothing at all under ZeRO-3), so the fp32 masters come from the ZeRO
  optimizer partitions (``*_optim_states.pt``, one per rank), put together by DeepSpeed's own
  offline ``zero_to_fp32`` (ZeRO-1/2/3). Its buffers are left out: the other backends do not
  write buffers and a freshly built model has them.

With ``ema=True``, the EMA of the same parameters instead (a ``train.ema = true`` run; fp32 on
every backend, what the writing run's ``backend.ema_state_dict()`` gave):

* ``none``: the same file's ``ema`` entry (``None`` without EMA).
* ``fsdp2``: the ``ema.<name>`` entries of ``dcp/`` (DTensor shards like the model's), reassembled
  by DCP in the same way.
* ``deepspeed``: ``ema_full.pt`` beside ``ds/`` under ZeRO-0/1/2 (written full by rank 0);
  ``ema_rank<r>.pt`` under ZeRO-3, each rank's flat fp32 partition of every parameter: the
  checkpoint's ``world_size`` partitions are concatenated in rank order, ZeRO-3's end padding cut
  off and the result shaped as DeepSpeed's module file (``param_shapes``) says
  (``deepspeed/ema.py``'s ``read_full``). No ``zero_to_fp32`` and no optimizer partition is read.

A checkpoint of a run without EMA (``train.ema = false``) is then a one-line error saying so.

Frozen parameters are in no checkpoint (every backend writes only the trainable ones; they come
from ``model.pretrained`` or the seeded init), so the result is the writing run's trainable set
under the plain model's parameter names (wrapper prefixes stripped): ``load_state_dict(sd,
strict=False)`` into a freshly built model (the EMA too, by the same names). Every pickle is
read by :mod:`framer_dist.safe_load`.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from framer_dist.parallel.base import META_FILE, meta_mismatch
from framer_dist.parallel.names import strip_wrapper_prefixes
from framer_dist.safe_load import (CheckpointLoadError, dcp_load, load_torch, read_dcp_metadata,
                                   safe_torch_loads)


def read_checkpoint_weights(path: str | Path, names: Iterable[str] | None = None, *,
                            ema: bool = False) -> dict[str, Tensor]:
    """The trained parameters (full, CPU; fp32 masters where the backend keeps them) in the
    complete checkpoint ``path`` (a ``step_XXXXXXXX`` folder, or a checkpoint root: the one its
    ``latest`` names), by plain parameter name: only ``names`` (in that order) when given, else
    all of them. ``ema=True``: their EMA (fp32; what the writing backend's ``ema_state_dict()``
    gave) instead of the live values, under the same names. A path that is no complete
    checkpoint, an unknown backend, an unreadable file, a name the checkpoint lacks or
    ``ema=True`` on a checkpoint of a run without EMA is a one-line :class:`CheckpointLoadError`."""
    from framer_dist.checkpoint import LATEST, _not_a_checkpoint, is_valid_checkpoint  # it imports us

    path = Path(path)
    if not path.exists():
        raise CheckpointLoadError(f"{path}: no such checkpoint folder")
    if path.is_dir() and not is_valid_checkpoint(path) and (path / LATEST).is_file():
        root, path = path, path / (path / LATEST).read_text().strip()  # a root, as resume takes it
        if not path.is_dir():
            raise CheckpointLoadError(f"{root / LATEST} names {path.name}, which is not in {root}")
    if not is_valid_checkpoint(path):
        raise CheckpointLoadError(_not_a_checkpoint(path))
    meta_file = path / META_FILE
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise CheckpointLoadError(f"{meta_file} is missing: {path} is not a framer_dist checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointLoadError(f"{meta_file}: not readable JSON ({e})") from None
    backend = meta.get("backend")
    # the layout version only: any backend and optimizer may be read here
    if problem := meta_mismatch(meta, path, backend, meta.get("optimizer")):
        raise CheckpointLoadError(problem)
    want = None if names is None else list(names)
    if backend == "none":
        sd = _read_single(path, ema)
    elif backend == "fsdp2":
        sd = _read_fsdp2(path, want, ema)
    elif backend == "deepspeed":
        sd = _read_deepspeed_ema(path, meta) if ema else _read_deepspeed(path, meta)
    else:
        raise CheckpointLoadError(f"{meta_file}: unknown backend {backend!r} (this framer_dist "
                                  "reads 'none', 'fsdp2' and 'deepspeed' checkpoints)")
    sd = {strip_wrapper_prefixes(k): v for k, v in sd.items()}
    if want is None:
        return sd
    _check_names(path, want, list(sd))
    return {n: sd[n] for n in want}


def _check_names(path: Path, want: list[str], held: list[str]) -> None:
    """Every name in ``want`` is among ``held``; else an error naming the first missing one."""
    have = set(held)
    for n in want:
        if n not in have:
            some = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise CheckpointLoadError(f"{path}: the checkpoint holds no weight {n!r} (it holds "
                                      f"{len(held)}: {some})")


def _no_ema(path: Path) -> CheckpointLoadError:
    return CheckpointLoadError(f"{path}: the run that wrote this checkpoint had no EMA (train.ema = "
                               "false), so it holds no EMA weights to read (ema=True)")


def _read_single(path: Path, ema: bool) -> dict[str, Tensor]:
    from framer_dist.parallel.single import STATE_FILE

    f = path / STATE_FILE
    state = load_torch(f, mmap=True)  # mapped: the optimizer state beside it is not read
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointLoadError(f"{f}: no 'model' entry (not a framer_dist 'none' checkpoint)")
    if not ema:
        return {k: v.clone() for k, v in state["model"].items()}
    if state.get("ema") is None:
        raise _no_ema(path)
    if not isinstance(state["ema"], dict):
        raise CheckpointLoadError(f"{f}: its 'ema' entry is a {type(state['ema']).__name__}, "
                                  "not the EMA's tensors by name")
    return {k: v.clone() for k, v in state["ema"].items()}


def _read_fsdp2(path: Path, want: list[str] | None, ema: bool) -> dict[str, Tensor]:
    """Only the ``model.*`` entries (``ema``: the ``ema.*`` ones; ``want`` of them, where they
    exist), into CPU templates built from the metadata: DCP reassembles the shards into them."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from framer_dist.parallel.fsdp import DCP_DIR

    dcp_dir = path / DCP_DIR
    md = read_dcp_metadata(dcp_dir / ".metadata")
    prefix = "ema." if ema else "model."
    held = {strip_wrapper_prefixes(k[len(prefix):]): (k, m) for k, m in md.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if ema and not held:
        raise _no_ema(path)
    if want is not None:  # before reading any shard
        _check_names(path, want, list(held))
    wanted = None if want is None else set(want)
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for n, (k, m) in held.items() if wanted is None or n in wanted}
    if state:
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(state, dcp_dir)
    return {k[len(prefix):]: v for k, v in state.items()}


def _read_deepspeed(path: Path, meta: dict) -> dict[str, Tensor]:
    from framer_dist.parallel.deepspeed.backend import TAG, DeepSpeedBackend

    if int(meta.get("zero_stage", 3)) == 0:
        raise CheckpointLoadError(f"{path}: a DeepSpeed ZeRO stage 0 checkpoint; its weights are "
                                  "read only by resuming it (zero_to_fp32 needs ZeRO-1/2/3)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    where = path / TAG
    quiet = io.StringIO()  # zero_to_fp32 prints its progress and a tqdm bar
    try:
        with (safe_torch_loads(), contextlib.redirect_stdout(quiet),
              contextlib.redirect_stderr(quiet)):
            module_file = DeepSpeedBackend._mp_rank_file(path)
            buffers = set(load_torch(module_file, mmap=True).get("buffer_names", ()))
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG, lazy_mode=True)
            # ZeRO-3: pseudo tensors put together here; ZeRO-1/2: views of the merged partitions
            return {k: v.contiguous().clone().detach() for k, v in lazy.items() if k not in buffers}
    except CheckpointLoadError:
        raise
    except (OSError, ValueError, KeyError, IndexError, RuntimeError) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointLoadError(f"{where}: not a readable DeepSpeed ZeRO checkpoint "
                                  f"({type(e).__name__}: {msg})") from None


def _read_deepspeed_ema(path: Path, meta: dict) -> dict[str, Tensor]:
    """The EMA files ``ZeroEMALayout.save`` wrote beside ``ds/`` (any ZeRO stage), put together by
    ``deepspeed/ema.py``'s ``read_full``; ZeRO-3's shapes from DeepSpeed's module file."""
    from framer_dist.parallel.deepspeed.ema import read_full

    def shapes() -> dict[str, tuple[int, ...]]:  # ZeRO-3 only
        from framer_dist.parallel.deepspeed.backend import DeepSpeedBackend

        module_file = DeepSpeedBackend._mp_rank_file(path)
        groups = load_torch(module_file, mmap=True).get("param_shapes") or ()
        out: dict[str, tuple[int, ...]] = {}
        for g in groups if isinstance(groups, (list, tuple)) else (groups,):
            out.update(g)
        return out

    try:
        sd = read_full(path, int(meta.get("world_size", 1)), shapes)
    except CheckpointLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointLoadError(f"{path}: not a readable DeepSpeed EMA ({type(e).__name__}: "
                                  f"{msg})") from None
    if not sd:
        raise _no_ema(path)
    return sd
