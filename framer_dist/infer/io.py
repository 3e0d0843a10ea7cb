"""Image files in and out: listing folders, reading with clear errors, writing PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from framer_dist.data.images import IMAGE_EXTS


class InferenceError(RuntimeError):
    """A user-facing problem (missing file, unreadable image, bad option); the message says which."""


def list_images(path: str | Path) -> list[Path]:
    """One image file, or the image files of a folder (sorted, non-recursive)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise InferenceError(f"input not found: {p}")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise InferenceError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {p}")
    return files


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` (converted like the training data, framer_dist.data.images.to_rgb);
    an unreadable or missing file raises ``InferenceError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InferenceError(f"image not found: {p}")
    from framer_dist.data.images import to_rgb

    try:
        with Image.open(p) as im:
            # the training data's conversion: 16-bit scaled (convert("RGB") clips it to white),
            # alpha composited on white, EXIF orientation applied
            return np.asarray(to_rgb(im)[0], dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InferenceError(f"cannot read image {p}: {e}") from None


def to_tensor(img: np.ndarray) -> Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[1, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0


def to_uint8(x: Tensor) -> np.ndarray:
    """float ``[3, H, W]`` (or ``[1, 3, H, W]``) in [0, 1] -> uint8 ``[H, W, 3]`` (rounded)."""
    if x.ndim == 4:
        x = x[0]
    return (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def write_image(path: str | Path, img: np.ndarray) -> None:
    from PIL import Image

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(p)
