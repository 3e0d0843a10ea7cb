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


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_final_files_get_the_mode_open_gives_a_new_file(tmp_path: Path, umask: int) -> None:
    """Teammates on a shared cluster read exports, checkpoints and data shards: the final files
    have ``0o666 & ~umask`` (what ``open()`` gives), not the 0600 of a private temporary file
    (safetensors writes through one; so does diffusers' ``save_pretrained``)."""
    import os
    import stat

    from safetensors.torch import save_file

    def mode(p: Path) -> int:
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(umask)
    try:
        want = 0o666 & ~umask
        st = save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
        save_safetensors_atomic({"a": torch.ones(2)}, st)  # replacing keeps the normal mode
        write_text_atomic(tmp_path / "t.txt", "one")

        def export(d: Path) -> None:
            d.mkdir()
            save_file({"w": torch.zeros(3)}, str(d / "model.safetensors"))
            (d / "config.json").write_text("{}")

        out = write_dir_atomic(tmp_path / "model", export)
        with open(tmp_path / "reference", "w") as f:  # what a plain open() gives
            f.write("x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "reference") == want
    assert mode(st) == want
    assert mode(tmp_path / "t.txt") == want
    assert mode(out / "model.safetensors") == want
    assert mode(out / "config.json") == want
