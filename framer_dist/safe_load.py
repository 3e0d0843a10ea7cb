"""Load the pickle-bearing files of a checkpoint without running code from them.

People share checkpoints. ``torch.load(weights_only=False)``, DeepSpeed's loaders (its checkpoint
engine, ``ds_to_universal``, the universal loader and ``zero_to_fp32``, which all unpickle with
``weights_only=False`` in 0.19.8) and DCP's ``.metadata`` reader (a plain ``pickle.load``) run
whatever a crafted file tells them to. Here every such file is read by an unpickler that builds
tensors, containers and an explicit allow-list of types, nothing else:

* :func:`load_torch` - our own files: ``torch.load(weights_only=True)`` with :func:`allowed_globals`;
* :func:`safe_torch_loads` - a scope in which every ``torch.load`` (DeepSpeed's and DCP's own
  calls included, whatever ``weights_only`` they pass) goes through :func:`load_torch`; DeepSpeed
  has no single seam for its loads (its checkpoint engine is one of several callers);
* :class:`SafeFileSystemReader` / :class:`SafeLoadPlanner` - DCP's documented seams, used for
  ``dcp.load``: the metadata through :class:`_MetadataUnpickler`, the non-tensor entries through
  :func:`load_torch`.

A file that needs anything else is refused with a :class:`CheckpointLoadError`: one line naming
the file and the type. Safetensors and JSON (exports, caches, pretrained folders) carry no code.
"""

from __future__ import annotations

import contextlib
import functools
import io
import pickle
import re
from pathlib import Path
from typing import IO, Any, Iterator

import torch

# The checkpoint layout this code writes (recorded in backend_meta.json as "format"). Checkpoints
# written before the number was recorded have the same layout and count as 1. Raise it when the
# layout changes, and teach the loaders the old one or refuse it by number.
FORMAT_VERSION = 1


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that cannot (or must not) be loaded; the message is one line."""


@functools.cache
def allowed_globals() -> list[Any]:
    """The non-tensor types a framer_dist checkpoint may hold, beyond what ``weights_only``
    always accepts (tensors, dtypes, containers, numbers, strings):

    * numpy's array reconstruction: ``np.random.get_state()`` in the RNG files (a uint32 array);
    * DeepSpeed's optimizer states: its ``LossScaler`` (a plain attribute holder),
      ``ZeroStageEnum`` and, under ZeRO-1/2, ``fragment_address`` (a dataclass of two ints); its
      universal checkpoint files hold only tensors and containers.
    """
    import numpy as np

    allowed: list[Any] = [np.ndarray, np.dtype, np.dtypes.UInt32DType]
    reconstruct = getattr(getattr(np, "_core", np.core), "multiarray")._reconstruct
    allowed.append(reconstruct)
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # no DeepSpeed: its checkpoints cannot be resumed anyway
        pass
    else:
        allowed += [LossScaler, ZeroStageEnum, fragment_address]
    return allowed


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_orig_torch_load = torch.load


def _describe(f: Any) -> str:
    if isinstance(f, (str, Path)):
        return str(f)
    return getattr(f, "name", None) or "a checkpoint entry"


def refusal(where: str, type_name: str) -> CheckpointLoadError:
    return CheckpointLoadError(
        f"{where}: refused to load: it holds a {type_name} object, which is not on the list of "
        "types a checkpoint may contain (unpickling it could run code from the file; "
        "framer_dist never writes one)")


def load_torch(f: str | Path | IO[bytes], map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load(f, weights_only=True)`` with :func:`allowed_globals`; a file that needs
    another type, or is not a torch file at all, is a :class:`CheckpointLoadError` naming it.
    ``kwargs`` (e.g. ``mmap``) pass through; ``weights_only`` and ``pickle_module`` are ignored."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    where = _describe(f)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return _orig_torch_load(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        m = _GLOBAL.search(str(e))
        if m:
            raise refusal(where, m.group(1)) from None
        # e.g. "Unsupported operand 149": a pickle that torch.save does not write
        why = str(e).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        raise CheckpointLoadError(f"{where}: refused to load: {why[0] if why else e!r} (not a "
                                  "file framer_dist writes)") from None
    except FileNotFoundError:
        raise CheckpointLoadError(f"{where}: missing (the checkpoint is incomplete)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointLoadError(f"{where}: not a readable torch file ({msg})") from None


@contextlib.contextmanager
def safe_torch_loads() -> Iterator[None]:
    """Within the block, every ``torch.load`` in this process is :func:`load_torch` (the
    ``weights_only=False`` that DeepSpeed and DCP pass is overridden). For third-party loaders
    without a seam; our own code calls :func:`load_torch` directly."""
    def load(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
        return load_torch(f, map_location=map_location, **kwargs)

    saved = torch.load
    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = saved  # type: ignore[assignment]


# ----------------------------------------------------------------------------------------------
# DCP


def _dcp_metadata_allowed() -> dict[tuple[str, str], Any]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {}
    for mod, names in ((metadata, ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                   "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                   "StorageMeta", "_MEM_FORMAT_ENCODING")),
                       (filesystem, ("_StorageInfo",)),
                       (pathlib, ("PosixPath", "PurePosixPath")),
                       (torch, ("Size",)),
                       (torch.serialization, ("_get_layout",))):
        for n in names:
            if hasattr(mod, n):
                allowed[(mod.__name__, n)] = getattr(mod, n)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata``: its dataclasses, ``torch.Size``, dtypes, layouts and paths only."""

    def __init__(self, file: IO[bytes], where: str) -> None:
        super().__init__(file)
        self.where = where
        self.allowed = _dcp_metadata_allowed()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise refusal(self.where, f"{module}.{name}")


def read_dcp_metadata(path: str | Path) -> Any:
    """A DCP ``.metadata`` file through :class:`_MetadataUnpickler`."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return _MetadataUnpickler(fh, str(path)).load()
    except CheckpointLoadError:
        raise
    except FileNotFoundError:
        raise CheckpointLoadError(f"{path}: missing (the checkpoint is incomplete)") from None
    except Exception as e:  # a truncated or foreign file: pickle raises many kinds
        raise CheckpointLoadError(f"{path}: not a readable DCP metadata file "
                                  f"({type(e).__name__}: {e})") from None


def _dcp_classes() -> tuple[type, type]:
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file reader with :func:`read_dcp_metadata` instead of ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, its non-tensor entries read by :func:`load_torch`."""

        def __init__(self, where: str) -> None:
            super().__init__()
            self.where = where

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            value.name = f"{self.where} (entry {read_item.dest_index.fqn})"  # for the error
            with safe_torch_loads():
                super().load_bytes(read_item, value)

    return SafeFileSystemReader, SafeLoadPlanner


def dcp_load(state: dict[str, Any], checkpoint_dir: str | Path) -> None:
    """``dcp.load(state, checkpoint_id=checkpoint_dir)`` through the safe reader and planner."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader_cls, planner_cls = _dcp_classes()
    try:
        dcp.load(state, storage_reader=reader_cls(str(checkpoint_dir)),
                 planner=planner_cls(str(checkpoint_dir)))
    except CheckpointException as e:  # DCP gathers every rank's failure into one exception
        ours = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointLoadError)]
        if ours:
            raise ours[0] from None
        raise
