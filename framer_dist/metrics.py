"""Training telemetry: TensorBoard scalars and images, throughput/MFU/memory, the FRAMER heat map.

Everything here is rank-local and cheap; the trainer decides which rank logs (rank 0 unless
``log.all_ranks``, then one sub-directory per rank). The documented TensorBoard tags are
:data:`SCALAR_TAGS` (always), :data:`FRAMER_TAGS` (when FRAMER is on) and the images in
:data:`IMAGE_TAGS`; docs/training.md lists them with their meaning.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

SCALAR_TAGS = ("loss/noise", "loss/total", "lr", "grad_norm", "perf/img_per_s",
               "perf/data_wait_share", "perf/step_time_s", "memory/peak_gb")
FRAMER_TAGS = ("loss/framer",)
MFU_TAG = "perf/mfu"                # only where the device's peak FLOP/s is known
IMAGE_TAGS = ("framer/heatmap",)    # plus "val/sr" when log.val_every > 0
# docs/specs/framer.md section 6: w, a, the losses (l_lf / l_hf: L_intra on LF and L_inter on HF
# with the default band assignment) and the teacher cosine, over layers x {LF, HF}
HEATMAP_ROWS = (("w", "w_lf", "w_hf"), ("a", "a_lf", "a_hf"), ("loss", "l_lf", "l_hf"),
                ("cosine", "cos_lf", "cos_hf"))


class TBWriter:
    """A thin TensorBoard writer that is a no-op when disabled (non-logging ranks).

    ``purge_step``: a resumed run's first step. TensorBoard then hides the events an interrupted
    run logged at that step and later (after its last checkpoint), which the resumed run logs
    again, instead of showing both."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, purge_step: int | None = None):
        self.enabled = enabled
        self._w = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # import here: only logging ranks pay
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._w = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._w is None:
            return
        for tag, v in values.items():
            self._w.add_scalar(tag, float(v), step)

    def image(self, tag: str, img_hwc: np.ndarray, step: int) -> None:
        """``img_hwc``: uint8 [H, W, 3] (or float in [0, 1])."""
        if self._w is not None:
            self._w.add_image(tag, img_hwc, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._w is not None:
            self._w.add_text(tag, text, step)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


def framer_layer_scalars(metrics: Mapping[str, Tensor], layers: list[int]) -> dict[str, float]:
    """Per-layer FRAMER metrics as scalars ``framer/<metric>/layer_<idx>``."""
    out = {}
    for key, vals in metrics.items():
        v = vals.detach().float().cpu().reshape(-1)
        if v.numel() != len(layers):
            continue  # a scalar summary metric, not per layer
        for idx, x in zip(layers, v.tolist()):
            out[f"framer/{key}/layer_{idx:02d}"] = x
    return out


def heatmap_image(metrics: Mapping[str, Tensor], layers: list[int], step: int | None = None,
                  ) -> np.ndarray:
    """The layers x {LF, HF} heat map of w (FAW), a (FAM), the band losses and the teacher cosine,
    as RGB uint8 (colour range: [0, 1] for w and a, [-1, 1] for the cosine, [0, max] for the loss).

    This is the per-layer picture of the paper's Fig. 7/9: where along depth each band aligns
    with the teacher.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [(name, lf, hf) for name, lf, hf in HEATMAP_ROWS if lf in metrics and hf in metrics]
    if not panels:
        raise KeyError(f"no heat-map metrics among {sorted(metrics)}; expected pairs "
                       f"{[(lf, hf) for _, lf, hf in HEATMAP_ROWS]}")
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels) + 1.2,
                                                        1.2 + 0.25 * len(layers)),
                             squeeze=False, dpi=80)
    for ax, (name, lf, hf) in zip(axes[0], panels):
        grid = torch.stack([metrics[lf].detach().float().cpu().reshape(-1),
                            metrics[hf].detach().float().cpu().reshape(-1)], dim=1).numpy()
        if name == "loss":  # unbounded above (InfoNCE starts near log(number of keys))
            lo, hi = 0.0, max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0, 1e-6)
        else:
            lo, hi = (-1.0, 1.0) if name == "cosine" else (0.0, 1.0)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=hi,
                       interpolation="nearest")
        if len(layers) <= 16:  # few layers: print the values too
            for (r, c), v in np.ndenumerate(grid):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < (lo + hi) / 2 else "black")
        ax.set_xticks([0, 1], ["LF", "HF"])
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=6)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.08)
    axes[0][0].set_ylabel("layer")
    if step is not None:
        fig.suptitle(f"FRAMER per layer, step {step}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from PIL import Image
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


class Throughput:
    """Wall-clock split of the steps in a logging window into waiting-for-data and the rest."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._data = 0.0
        self._samples = 0
        self._steps = 0
        self._mark: float | None = None

    def data_start(self) -> None:
        self._mark = time.perf_counter()

    def data_end(self) -> None:
        if self._mark is not None:
            self._data += time.perf_counter() - self._mark
            self._mark = None

    def step_done(self, samples: int) -> None:
        self._samples += samples
        self._steps += 1

    def summary(self, flops_per_sample: float | None = None, peak: float | None = None,
                world_size: int = 1) -> dict[str, float]:
        """Rates over the window since the last reset; ``samples`` are this rank's."""
        wall = max(time.perf_counter() - self._t0, 1e-9)
        out = {"perf/img_per_s": self._samples * world_size / wall,
               "perf/data_wait_share": self._data / wall,
               "perf/step_time_s": wall / max(self._steps, 1)}
        if flops_per_sample and peak:
            out[MFU_TAG] = flops_per_sample * self._samples / wall / peak
        return out


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or on CPU the process's peak resident set, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """Rank-0 tqdm bar with ETA; a dummy when disabled or not attached to anything useful."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=os.environ.get("FRAMER_NO_PROGRESS") == "1")


def bar_print(bar: Any, line: str) -> None:
    """Print ``line`` (stdout, flushed) on a line of its own: a tqdm bar is cleared first and
    redrawn below it, so a message never lands after the bar's text."""
    with (bar.external_write_mode() if hasattr(bar, "external_write_mode")
          else contextlib.nullcontext()):
        print(line, flush=True)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a: Any, **k: Any) -> None: ...
    def write(self, s: str) -> None: print(s, flush=True)
    def close(self) -> None: ...
