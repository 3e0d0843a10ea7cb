"""Atomic file writes: a reader (or a resumed run) sees the old file or the whole new one, never a
half-written one. Write to a temporary name in the same directory, fsync, then rename.

The final files get the mode a plain ``open()`` would give a new file, ``0o666 & ~umask``, even
where the writer underneath creates its temporary file private (safetensors >= 0.8 writes through
a 0600 temporary file): teammates on a shared cluster must be able to read exports, checkpoints
and prepared data as the user's umask allows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}.{os.getpid()}")


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``);
    elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path, umask: int | None = None) -> None:
    """Give ``path`` (a regular file) the permissions ``open()`` would give a new file:
    ``0o666 & ~umask``; execute bits it already has stay, as the umask allows them."""
    umask = _umask() if umask is None else umask
    st = os.stat(path)
    os.chmod(path, ((0o666 | (st.st_mode & 0o111)) & ~umask) & 0o777)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _new_file_mode(tmp)
        os.replace(tmp, path)
    finally:  # a failed write (disk full) leaves the previous file and no temporary
        tmp.unlink(missing_ok=True)


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
        _new_file_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_dir_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Let ``write(tmp_dir)`` fill a temporary sibling folder, then move it to ``path`` (an existing
    ``path`` is replaced: the final name never holds a partial folder). Every file in it gets the
    mode ``open()`` gives a new file (``save_pretrained`` writes safetensors files 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        umask = _umask()
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                _new_file_mode(f, umask)
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
