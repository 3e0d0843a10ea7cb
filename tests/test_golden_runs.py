"""tools/golden_runs.py compare: bit-identical recordings pass, any changed value or bit is named.
(The recordings themselves are made on one machine before and after a refactor, not in CI.)"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from golden_runs import compare, main  # noqa: E402


def _recording(root: Path, loss: float = 0.5, weight: float = 1.0) -> Path:
    run = root / "none-control"
    (run / "export").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss/total": loss}) + "\n")
    save_file({"w": torch.full((3,), weight)}, str(run / "export" / "dit4sr_control.safetensors"))
    (root / "recording.json").write_text(json.dumps({"commit": "x", "runs": ["none-control"]}))
    return root


def test_compare_is_bit_exact(tmp_path, capsys):
    a = _recording(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert compare(a, b) == [] and main(["compare", str(a), str(b)]) == 0
    assert "bit-identical: none-control" in capsys.readouterr().out
    c = _recording(tmp_path / "c", loss=0.5 + 2 ** -40)  # one low bit of a logged loss
    assert compare(a, c) == ["none-control: metrics differ from line 1"]
    d = _recording(tmp_path / "d", weight=float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))))
    assert compare(a, d) == ["none-control: 1 exported tensors differ, e.g. "
                             "['dit4sr_control.safetensors:w']"]
    assert main(["compare", str(a), str(d)]) == 1
