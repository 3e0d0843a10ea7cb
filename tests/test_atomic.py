"""Atomic writes: the final name holds the old content or the whole new one, never a partial file."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framer_dist.atomic import save_safetensors_atomic, write_dir_atomic, write_text_atomic


def test_safetensors_and_text_replace_whole_files(tmp_path: Path) -> None:
    p = save_safetensors_atomic({"a": torch.arange(4.0)}, tmp_path / "sub" / "x.safetensors",
                                metadata={"k": "v"})
    assert torch.equal(load_file(p)["a"], torch.arange(4.0))
    save_safetensors_atomic({"a": torch.ones(2)}, p)
    assert torch.equal(load_file(p)["a"], torch.ones(2))
    write_text_atomic(tmp_path / "t.txt", "one")
    write_text_atomic(tmp_path / "t.txt", "two")
    assert (tmp_path / "t.txt").read_text() == "two"
    assert sorted(q.name for q in tmp_path.rglob("*")) == ["sub", "t.txt", "x.safetensors"]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = save_safetensors_atomic({"a": torch.zeros(3)}, tmp_path / "x.safetensors")
    with pytest.raises(Exception):  # a non-tensor value fails inside the writer
        save_safetensors_atomic({"a": "not a tensor"}, p)  # type: ignore[dict-item]
    assert torch.equal(load_file(p)["a"], torch.zeros(3))
    assert [q.name for q in tmp_path.iterdir()] == ["x.safetensors"]


def test_directory_is_complete_or_absent(tmp_path: Path) -> None:
    def good(d: Path) -> None:
        d.mkdir()
        (d / "f").write_text("new")

    def broken(d: Path) -> None:
        d.mkdir()
        (d / "f").write_text("half")
        raise RuntimeError("disk full")

    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        write_dir_atomic(out, broken)
    assert not out.exists()
    write_dir_atomic(out, good)
    assert (out / "f").read_text() == "new"
    with pytest.raises(RuntimeError):
        write_dir_atomic(out, broken)
    assert (out / "f").read_text() == "new"  # the previous export survives a failed one
    assert [q.name for q in tmp_path.iterdir()] == ["model"]
