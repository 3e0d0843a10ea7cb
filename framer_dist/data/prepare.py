"""Offline training pairs: HR crops -> degradation -> VAE latents of HR and bicubic-LR, written as
the cached-pair shards that the ``cached`` source reads (the logic behind ``tools/prepare_data.py``).

The work is a flat list of (image, pass) units, ``passes`` degradations of every image (pass-major),
cut into shards of ``shard_size`` units: shard ``k`` is done by worker ``k % num_workers``.
A shard is written to a temporary name and renamed, so a re-run skips finished shards and redoes
only the one in progress. ``manifest.json`` pins the parameters; resuming with other ones is refused.
Each unit's crop and degradation come from ``mix(seed, image index, pass)``: the output does not
depend on the number of workers or devices.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..atomic import save_safetensors_atomic, write_text_atomic
from ..config import DataConfig
from ..models import DEFAULT_FAMILY
from .captioning import open_images
from .degrade import degrade, params_from_config
from .images import DataReport, ImageSkipped, read_crop, where
from .stream import mix
from .text_encode import DTYPES
from .vae import load_vae

log = logging.getLogger("framer_dist.data")


def _manifest(out: Path, params: dict) -> None:
    m = out / "manifest.json"
    if m.is_file():
        old = json.loads(m.read_text())
        if old != params:
            diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
            raise ValueError(f"{out} holds shards made with other parameters {diff} (old, new); "
                             "use another --out folder")
        return
    write_text_atomic(m, json.dumps(params, indent=1))


def prepare_pairs(images: str, out_dir: str | Path, *, resolution: int = 512, scale: int = 4,
                  passes: int = 1, seed: int = 0, vae_path: str = "", shard_size: int = 64,
                  batch_size: int = 8, worker: int = 0, num_workers: int = 1, device: str = "cpu",
                  dtype: str = "bf16", min_size: int = 64, usm: bool = True,
                  limit_shards: int | None = None, family: str = DEFAULT_FAMILY) -> DataReport:
    """Write this worker's missing shards (latents of ``family``'s codec); returns what was
    skipped/converted."""
    if resolution % (scale * 8):
        raise ValueError(f"--resolution {resolution} must be a multiple of scale x 8 = {scale * 8}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    src = open_images(images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(images=str(images), n_images=len(src), resolution=resolution, scale=scale,
                  passes=passes, seed=seed, vae=vae_path, shard_size=shard_size, usm=usm,
                  min_size=min_size)
    if family != DEFAULT_FAMILY:  # absent = the default, as in manifests written before families
        params["family"] = family
    _manifest(out, params)
    units = [(i, p) for p in range(passes) for i in range(len(src))]
    n_shards = -(-len(units) // shard_size)
    mine = [k for k in range(n_shards) if k % num_workers == worker
            and not (out / f"pairs-{k:05d}.safetensors").is_file()]
    if limit_shards is not None:
        mine = mine[:limit_shards]
    report = DataReport()
    if not mine:
        return report
    vae = load_vae(DataConfig(vae=vae_path), family, device=device)
    params = params_from_config(scale, usm)
    dt = DTYPES[dtype]
    for k in mine:
        ids, crops, seeds = [], [], []
        for i, p in units[k * shard_size:(k + 1) * shard_size]:
            item = src.item_id(i)
            s = mix(seed, i, p)
            try:
                crop, conv = read_crop(src, i, item, resolution, min_size, np.random.default_rng([s, 0xC0]))
            except ImageSkipped as e:
                if p == 0:
                    report.add(e.kind, where(src, i), str(e))
                continue
            if p == 0:
                for c in conv:
                    report.add(c, item)
            ids.append(f"{item}#{p}")
            crops.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1))
            seeds.append(s)
        hr_l, lr_l = [], []
        for b in range(0, len(crops), batch_size):
            hr = torch.stack(crops[b:b + batch_size]).to(device).float() / 255.0
            # a shard's short last batch runs eagerly: no CUDA graph (and pool) per odd size
            o = degrade(hr, seeds[b:b + batch_size], params, graph=None if len(hr) == batch_size else False)
            keys = torch.tensor(seeds[b:b + batch_size], dtype=torch.long)
            hr_l.append(vae.encode(o["hr"] * 2 - 1, keys).to(dt).cpu())
            lr_l.append(vae.encode(o["lr_up"] * 2 - 1, keys).to(dt).cpu())
        path = out / f"pairs-{k:05d}.safetensors"
        if ids:
            save_safetensors_atomic({"hr_latent": torch.cat(hr_l), "lr_latent": torch.cat(lr_l)},
                                    path, metadata={"ids": json.dumps(ids)})
        log.info("worker %d: shard %d (%d pairs) done", worker, k, len(ids))
    return report
