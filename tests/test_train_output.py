"""What a user reads on the console during a real run of train.py: no noise from other libraries,
each line once and on its own line.

One 2-rank DeepSpeed ZeRO-3 run over gloo (the tiny model on the bundled photos, one of which is
grayscale, with the progress bar on), both ranks writing into one log as torchrun shows them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ranks import run_ranks  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "framer_dist" / "train.py"
TINY = REPO / "configs" / "tiny_cpu_demo.toml"
PHOTOS = REPO / "framer_dist" / "assets" / "photos"
STEPS = 4


def launch(world: int, args: list[str], log: Path) -> list[int]:
    """``world`` ranks of train.py (tests/_ranks.py), all writing into ``log``; no warning filter
    of our own (PYTHONWARNINGS) and the progress bar on, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "FRAMER_NO_PROGRESS")}
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(log.parent / "torch_ext"),
               PYTHONPATH=str(REPO))
    return run_ranks([sys.executable, str(TRAIN), *args], world, log, env)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("zero3_output")
    ds = tmp / "zero3.json"  # the shipped ZeRO-3 settings, tiny buckets: params really partitioned
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                     "reduce_bucket_size": 1 << 20,
                                     "stage3_prefetch_bucket_size": 1 << 20})
    ds.write_text(json.dumps(cfg))
    out = tmp / "run"
    log = tmp / "run.log"
    rc = launch(2, ["--config", str(TINY), "--ds", str(ds), "--out", str(out),
                    f'data.path="{PHOTOS.as_posix()}"', "data.batch_size=2", f"train.steps={STEPS}",
                    "log.every=2", "log.heatmap_every=0", "log.val_every=0", "checkpoint.every=0"],
                log)
    text = log.read_text()
    assert rc == [0, 0], text[-4000:]
    return {"out": out, "text": text, "lines": text.replace("\r", "\n").splitlines()}


def test_deepspeed_deprecated_collective_warnings_are_silenced(zero3_run):
    """torch's FutureWarnings about the collectives DeepSpeed calls (all_gather_into_tensor,
    reduce_scatter_tensor) were most of a ZeRO-3 run's output; they are gone, on both ranks."""
    text = zero3_run["text"]
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        assert name not in text, text[-4000:]


def _gray_draws_per_rank(world: int, batch: int) -> list[int]:
    """How often each rank's share of the run's global stream draws the grayscale photo."""
    from framer_dist.data.sources import FolderSource
    from framer_dist.data.stream import item_at, micro_batch_positions
    src = FolderSource(PHOTOS)
    return [sum(src.item_id(item_at(p, len(src), 0)) == "camera"
                for j in range(STEPS) for p in micro_batch_positions(0, j, r, world, batch))
            for r in range(world)]


def test_data_lines_print_once_with_the_counts_of_all_ranks(zero3_run):
    """Both ranks convert the grayscale photo; its `data:` line is printed once (rank 0), and the
    run ends with the counts summed over the ranks (what the stream's positions predict)."""
    per_rank = _gray_draws_per_rank(2, 2)
    assert all(per_rank), per_rank  # the setup: every rank meets the photo
    text, lines = zero3_run["text"], [l.strip() for l in zero3_run["lines"]]
    assert text.count("data: converted_gray: camera") == 1, text[-4000:]
    summary = [l for l in lines if l.startswith("data: converted_gray=")]
    assert summary == [f"data: converted_gray={sum(per_rank)} (summed over 2 ranks)"], summary


def test_data_lines_stand_on_their_own_line_next_to_the_progress_bar(zero3_run):
    """No `data:` line is glued to the progress bar's text (`1/4 [...]data: ...`)."""
    glued = [l for l in zero3_run["lines"] if "data: " in l and not l.startswith("data: ")]
    assert not glued, glued


def test_the_closing_line_is_printed_once(zero3_run):
    lines = [l for l in zero3_run["lines"] if l.startswith("[framer_dist] done:")]
    assert len(lines) == 1 and f"step {STEPS} of {STEPS}" in lines[0], zero3_run["text"][-3000:]
