"""Latent tiling with Gaussian blending (large-image inference; StableSR's and DiT4SR's scheme).

At every sampling step a family's sampler may compute the model output (e.g. the velocity) of a
large latent tile by tile (default 64x64 latent tiles = 512 px at a /8 VAE, overlap 24) and blend
the overlapping tiles with a per-tile Gaussian weight centred on the tile. A latent that fits in one tile is passed through
untouched, so tiled and untiled sampling agree exactly there.

``seam_score`` measures how visible tile borders are in a result (used by the tests and the docs):
the gradient energy across the columns/rows where a tile starts or ends, relative to the median
gradient energy of all columns/rows. A hard seam gives a spike far above 1.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# (z [B,C,h,w], lr_latent [B,C,h,w], sigma: 0-d tensor) -> the model's output [B,C,h,w]
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, size)`` with tiles of ``tile`` overlapping by >= ``overlap``.

    The last tile is aligned to the end (its overlap with the previous one may be larger).
    """
    if size <= tile:
        return [0]
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"tiling needs 0 <= overlap < tile, got tile={tile} overlap={overlap}")
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return sorted(set(starts))


def gaussian_weight(h: int, w: int, rel_std: float = 0.1, device=None) -> Tensor:
    """Separable Gaussian bump ``[h, w]`` centred on the tile, std = ``rel_std`` x side, max 1.

    It never reaches 0 at the border, so every latent position has a positive total weight.
    """
    def g(n: int) -> Tensor:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        return torch.exp(-0.5 * (x / (rel_std * n)) ** 2)
    return g(h)[:, None] * g(w)[None, :]


def tiled_denoiser(fn: Denoiser, tile: int, overlap: int, rel_std: float = 0.1,
                   tile_batch: int = 1, multiple: int = 1, blend: str = "gaussian") -> Denoiser:
    """Wrap a denoiser so latents larger than ``tile`` are processed in blended tiles.

    ``multiple``: tile sizes and offsets must be multiples of it (the model's latent multiple, e.g.
    a transformer's patch size).
    ``tile_batch``: tiles per forward call (same-size tiles are stacked on the batch axis).
    ``blend``: ``gaussian`` (default) or ``hard`` (later tiles overwrite: only to demonstrate seams).
    """
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"tiling needs 0 <= overlap < tile, got tile={tile} overlap={overlap}")
    if tile % multiple or overlap % multiple:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of {multiple} "
                         "(the model's latent grid, e.g. a transformer's patch size)")
    if blend not in ("gaussian", "hard"):
        raise ValueError(f"blend must be 'gaussian' or 'hard', got {blend!r}")

    def run(z: Tensor, lr: Tensor, sigma: Tensor) -> Tensor:
        H, W = z.shape[-2:]
        if H <= tile and W <= tile:
            return fn(z, lr, sigma)
        if H % multiple or W % multiple:
            raise ValueError(f"latent size {H}x{W} is not a multiple of {multiple}")
        th, tw = min(tile, H), min(tile, W)
        boxes = [(y, x) for y in tile_starts(H, th, overlap) for x in tile_starts(W, tw, overlap)]
        out = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
        wsum = torch.zeros((H, W), dtype=torch.float32, device=z.device)
        wt = gaussian_weight(th, tw, rel_std, device=z.device)
        for i in range(0, len(boxes), tile_batch):
            group = boxes[i:i + tile_batch]
            zs = torch.cat([z[..., y:y + th, x:x + tw] for y, x in group])
            ls = torch.cat([lr[..., y:y + th, x:x + tw] for y, x in group])
            vs = fn(zs, ls, sigma).float().split(z.shape[0])
            for (y, x), v in zip(group, vs):
                if blend == "hard":
                    out[..., y:y + th, x:x + tw] = v
                else:
                    out[..., y:y + th, x:x + tw] += v * wt
                    wsum[y:y + th, x:x + tw] += wt
        return out if blend == "hard" else out / wsum
    return run


def tile_borders(size: int, tile: int, overlap: int) -> list[int]:
    """Gap indices ``j`` (between position j and j+1) where some tile starts or ends inside."""
    if size <= tile:
        return []
    b = set()
    for s in tile_starts(size, tile, overlap):
        if s > 0:
            b.add(s - 1)
        if s + tile < size:
            b.add(s + tile - 1)
    return sorted(b)


def seam_score(x: Tensor, borders_h: list[int], borders_w: list[int]) -> float:
    """Worst border-to-typical gradient ratio of ``x`` ``[..., H, W]`` (1 = no visible seam).

    Per gap between adjacent columns (rows), the mean absolute difference over everything else;
    the score is the largest value at a tile border divided by the median over all gaps.
    """
    x = x.float()
    ratios = []
    if borders_w:
        gw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(0, -3).mean(dim=(0, 1))  # [W-1]
        ratios.append((gw[borders_w].max() / gw.median().clamp_min(1e-12)).item())
    if borders_h:
        gh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(0, -3).mean(dim=(0, 2))  # [H-1]
        ratios.append((gh[borders_h].max() / gh.median().clamp_min(1e-12)).item())
    return max(ratios) if ratios else 1.0


def num_tiles(h: int, w: int, tile: int, overlap: int) -> int:
    """How many tiles ``tiled_denoiser`` runs for a latent of ``h x w``."""
    return len(tile_starts(h, min(tile, h), overlap)) * len(tile_starts(w, min(tile, w), overlap))
