"""Robust HR image decoding: any mode to 8-bit RGB, tiny/broken files reported, seeded crops.

Every problem is counted in a :class:`DataReport` and logged (the first few per kind), never
raised mid-epoch and never silent: corrupt or truncated files and images smaller than
``data.min_size`` are skipped; grayscale, palette, alpha, CMYK and 16-bit images are converted;
images smaller than the crop are upscaled.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps

log = logging.getLogger("framer_dist.data")

# The image files every reader looks for (training folder and tar sources, the captioner, framer-sr,
# the demo): formats PIL decodes that decode()/to_rgb() turn into 8-bit RGB (TIFF's 16-bit and
# float modes included). One list, so a file the demo or framer-sr reads is also training data.
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Kinds of events; "skipped_*" drop the file (another file takes its place), the others keep it.
SKIP_KINDS = ("skipped_corrupt", "skipped_tiny", "skipped_unreadable")


class ImageSkipped(Exception):
    """The file cannot be used; ``kind`` is one of ``SKIP_KINDS``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class DataReport:
    """Counts of what the data pipeline skipped or converted, with a few example ids per kind.

    Each new example is a line ``data: <kind>: <item> (<detail>)``, logged at once, or with
    ``echo=False`` kept for :meth:`take_new` (the trainer prints the lines of all ranks once, on
    rank 0, on their own line above the progress bar)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5
    echo: bool = True
    _new: list[tuple[str, str]] = field(default_factory=list, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, kind: str, item: str, detail: str = "") -> None:
        with self._lock:
            self.counts[kind] += 1
            ex = self.examples.setdefault(kind, [])
            if item not in ex and len(ex) < self.max_examples:  # warn once per item, not per epoch
                ex.append(item)
                line = f"data: {kind}: {item}" + (f" ({detail})" if detail else "")
                if self.echo:
                    log.warning("%s", line)
                else:
                    self._new.append((kind, line))

    def take_new(self) -> list[tuple[str, str]]:
        """The (kind, line) of each example added since the last call (``echo=False``)."""
        with self._lock:
            new, self._new = self._new, []
        return new

    def merge(self, events: list[tuple[str, str]]) -> None:
        for kind, item in events:
            self.add(kind, item)

    def as_dict(self) -> dict[str, int]:
        """Flat counts, e.g. for TensorBoard scalars ``data/<kind>``."""
        return dict(self.counts)

    def summary(self) -> str:
        return summary_line(self.counts)


def summary_line(counts: dict[str, int]) -> str:
    """``data: kind=n, ...`` (sorted by kind)."""
    if not counts:
        return "data: nothing skipped or converted"
    return "data: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB version of any PIL image; returns (image, conversion kind or None)."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB"), "converted_16bit"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), "converted_alpha"
    if mode == "CMYK":
        return img.convert("RGB"), "converted_cmyk"
    if mode in ("L", "1"):
        return img.convert("RGB"), "converted_gray"
    return img.convert("RGB"), f"converted_{mode.lower().replace(';', '')}"


def decode(data: bytes, item: str) -> tuple[np.ndarray, list[str]]:
    """Bytes -> uint8 ``[H, W, 3]`` and the list of conversions applied. Raises ImageSkipped
    (its message: PIL's reason; the caller names the file)."""
    buf = io.BytesIO(data)
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(buf) as im:
            im.load()
            rgb, conv = to_rgb(im)
            arr = np.asarray(rgb, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for bad files; all mean "unusable"
        # PIL names the in-memory buffer ("cannot identify image file <_io.BytesIO object at
        # 0x...>"), which says nothing: the caller names the file
        reason = str(e).replace(f" {buf!r}", "").replace(repr(buf), "the data")
        raise ImageSkipped("skipped_corrupt", f"{type(e).__name__}: {reason}") from None
    return arr, [conv] if conv else []


def crop_or_upscale(arr: np.ndarray, size: int, min_size: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, list[str]]:
    """A ``size x size`` crop at a seeded position; images with a side below ``size`` are first
    upscaled (bicubic, short side to ``size``); below ``min_size`` they are skipped."""
    h, w = arr.shape[:2]
    events = []
    if min(h, w) < min_size:
        raise ImageSkipped("skipped_tiny", f"{w}x{h} is below data.min_size={min_size}")
    if min(h, w) < size:
        s = size / min(h, w)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        arr = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.Resampling.BICUBIC))
        h, w = nh, nw
        events.append("upscaled")
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return arr[y:y + size, x:x + size], events


def where(source, i: int) -> str:
    """Item ``i`` of ``source`` for a message: its file (folder), ``<shard>:<member>`` (tar)."""
    describe = getattr(source, "describe", None)
    return describe(i) if describe is not None else source.item_id(i)


def read_crop(source, i: int, item: str, size: int, min_size: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, list[str]]:
    """Read item ``i`` of an image source, decode and crop it (:func:`decode`,
    :func:`crop_or_upscale`): the crop and the conversions applied. Raises ImageSkipped, also for
    a file that cannot be read (``skipped_unreadable``: permissions, I/O errors), so one bad file
    is counted and skipped wherever images are read, never a crash."""
    try:
        data = source.read(i)
    except OSError as e:
        raise ImageSkipped("skipped_unreadable", f"{type(e).__name__}: {e}") from None
    arr, conv = decode(data, item)
    crop, events = crop_or_upscale(arr, size, min_size, rng)
    return crop, conv + events
