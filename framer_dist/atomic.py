"""Atomic file writes: a reader (or a resumed run) sees the old file or the whole new one, never a
half-written one. Write to a temporary name in the same directory, fsync, then rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}.{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` (contiguous CPU tensors) behind a temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_dir_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Let ``write(tmp_dir)`` fill a temporary sibling folder, then move it to ``path`` (an existing
    ``path`` is replaced: the final name never holds a partial folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".old-{path.name}.{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
