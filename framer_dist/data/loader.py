"""``build_dataloader``: the per-rank iterable of dict batches (docs/interfaces.md).

Batches by source (B = ``data.batch_size``, R = ``data.resolution``, latents at R/8):

- ``folder`` / ``webdataset`` (online degradation): ``hr_raw`` uint8 ``[B, 3, R, R]`` HR crops,
  ``seed`` int64 ``[B]``, plus the common keys. The trainer moves the batch to its device and calls
  :func:`framer_dist.data.encode_batch`, which degrades there (GPU) and adds ``hr``/``lr`` pixels
  in [-1, 1] and ``hr_latent``/``lr_latent``.
- ``cached``: ``hr_latent``, ``lr_latent`` ``[B, C, R/8, R/8]`` from prepare_data's shards.
- ``synthetic``: seeded random latents of the same shapes (C: the model family's latent channels).

Common keys: ``prompt_embeds [B, T, D]`` and ``pooled [B, P]`` (float32), ``index`` int64 ``[B]``
(global stream positions, see :mod:`.stream`), ``ids`` (list of item ids). The loader is infinite
(epoch after epoch); ``DataPipeline.report`` counts what was skipped or converted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import Config, DataConfig
from ..models import get_family
from .images import DataReport, ImageSkipped, read_crop, where
from .prompts import PromptStore, random_prompt, use_null_prompt
from .sources import CachedSource, DataSourceError, FolderSource, TarSource
from .stream import item_at, micro_batch_positions, mix, sample_seed

log = logging.getLogger("framer_dist.data")

LATENT_FACTOR = 8
MAX_REPLACEMENTS = 64


def prompt_shapes(cfg: Config) -> tuple[int, int, int]:
    """(T, D, P) of prompt embeddings: ``data.prompt_len`` and the model family's text widths."""
    return (cfg.data.prompt_len, *get_family(cfg.model.family).text_dims(cfg))


def open_source(d: DataConfig) -> FolderSource | TarSource | CachedSource | None:
    if d.source == "synthetic":
        return None
    if d.source == "folder":
        return FolderSource(d.path)
    if d.source == "webdataset":
        return TarSource(d.path)
    return CachedSource(d.path, resolution=d.resolution, scale=d.scale)


class SampleStream(IterableDataset):
    """Produces this rank's micro-batches from the global stream (one worker: every
    ``num_workers``-th micro-batch). Items are read by random access; an unusable item is
    replaced by the next one of the same epoch's permutation and reported."""

    def __init__(self, cfg: Config, rank: int, world_size: int, start_sample: int,
                 source: Any, prompts: PromptStore | None) -> None:
        super().__init__()
        self.d = cfg.data
        self.seed = cfg.train.seed
        self.rank, self.world, self.start = rank, world_size, start_sample
        self.source, self.prompts = source, prompts
        self.shapes = prompt_shapes(cfg)
        # synthetic latents have the family's channel count (its latent codec)
        family = get_family(cfg.model.family)
        self.channels = family.part("latents").channels if self.d.source == "synthetic" else 0
        # a family that draws the null prompt in its step gets every prompt as it is
        self.null_prob = 0.0 if family.own_null_prompt else self.d.null_prompt_prob
        if prompts is not None:
            (t, dd), (p,) = prompts.shapes
            if (dd, p) != self.shapes[1:]:
                raise DataSourceError(
                    f"config key 'data.prompt_embeddings': cached embeddings are [T={t}, D={dd}] "
                    f"and pooled [{p}], the model preset {cfg.model.preset!r} needs D={self.shapes[1]}"
                    f" and pooled {self.shapes[2]}")
            self.shapes = (t, dd, p)
        self._bad: set[int] = set()

    # -- one sample ------------------------------------------------------------------------
    def _prompt(self, seed: int, item_id: str, events: list) -> tuple[torch.Tensor, torch.Tensor]:
        t, dd, p = self.shapes
        null = use_null_prompt(seed, self.null_prob)
        if self.prompts is None:
            if null:
                return torch.zeros(t, dd), torch.zeros(p)
            return random_prompt(mix(seed, 0x7E), t, dd, p)
        if not null:
            got = self.prompts.get(item_id)
            if got is not None:
                return got[0].float(), got[1].float()
            events.append(("missing_prompt", item_id))
        return self.prompts.empty[0].float(), self.prompts.empty[1].float()

    def _image(self, pos: int, seed: int, events: list) -> tuple[np.ndarray, str]:
        n = len(self.source)
        rng = np.random.default_rng([seed, 0xC0])
        last = ""  # the last skip, for the error below
        for shift in range(min(n, MAX_REPLACEMENTS)):
            i = item_at(pos, n, self.seed, shift)
            if i in self._bad:
                continue
            item = self.source.item_id(i)
            try:
                crop, conv = read_crop(self.source, i, item, self.d.resolution, self.d.min_size, rng)
            except ImageSkipped as e:
                self._bad.add(i)
                events.append((e.kind, f"{where(self.source, i)} ({e})"))
                last = f"; the last: {events[-1][0]}: {events[-1][1]}"
                continue
            events.extend((c, item) for c in conv)
            return crop, item
        raise DataSourceError(f"config key 'data.path': {MAX_REPLACEMENTS} consecutive unusable "
                              f"images around stream position {pos} in {self.d.path} (corrupt "
                              f"files, images below data.min_size){last}")

    def _batch(self, positions: list[int]) -> dict[str, Any]:
        events: list[tuple[str, str]] = []
        seeds = [sample_seed(self.seed, g) for g in positions]
        out: dict[str, Any] = {"index": torch.tensor(positions, dtype=torch.long),
                               "seed": torch.tensor(seeds, dtype=torch.long)}
        ids, pe, po = [], [], []
        r, lat = self.d.resolution, self.d.resolution // LATENT_FACTOR
        if self.d.source == "synthetic":
            hr, lr = [], []
            for g, s in zip(positions, seeds):
                gen = torch.Generator().manual_seed(mix(s, 0x1A7))
                h = torch.randn(self.channels, lat, lat, generator=gen)
                hr.append(h)
                lr.append(h + 0.5 * torch.randn(self.channels, lat, lat, generator=gen))
                ids.append(f"synthetic/{g}")
            out["hr_latent"], out["lr_latent"] = torch.stack(hr), torch.stack(lr)
        elif self.d.source == "cached":
            hr, lr = [], []
            n = len(self.source)
            for g in positions:
                i = item_at(g, n, self.seed)
                row = self.source.read(i)
                hr.append(row["hr_latent"].float())
                lr.append(row["lr_latent"].float())
                ids.append(self.source.item_id(i))
            out["hr_latent"], out["lr_latent"] = torch.stack(hr), torch.stack(lr)
        else:
            crops = []
            for g, s in zip(positions, seeds):
                crop, item = self._image(g, s, events)
                crops.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1))
                ids.append(item)
            out["hr_raw"] = torch.stack(crops)
            out["degrade"] = {"scale": self.d.scale, "usm": self.d.usm_sharpen}
        for s, item in zip(seeds, ids):
            e, p = self._prompt(s, item, events)
            pe.append(e)
            po.append(p)
        out["prompt_embeds"], out["pooled"] = torch.stack(pe), torch.stack(po)
        out["ids"] = ids
        out["_events"] = events
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        j = w
        while True:
            yield self._batch(micro_batch_positions(self.start, j, self.rank, self.world,
                                                    self.d.batch_size))
            j += nw


class DataPipeline:
    """The iterable the trainer consumes; collects the workers' skip/convert events."""

    def __init__(self, stream: SampleStream, num_workers: int,
                 report: DataReport | None = None) -> None:
        self.stream = stream
        self.report = report if report is not None else DataReport()
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                                 persistent_workers=num_workers > 0,
                                 prefetch_factor=2 if num_workers > 0 else None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.report.merge(batch.pop("_events", []))
            yield batch

    @property
    def samples_per_step(self) -> int:
        """Global positions one micro-batch of every rank consumes together."""
        return self.stream.d.batch_size * self.stream.world


def yields_pixels(d: DataConfig) -> bool:
    """Whether ``d.source`` gives pixels (degraded and VAE-encoded by the trainer) or latents."""
    return d.source in ("folder", "webdataset")


def build_dataloader(cfg: Config, rank: int, world_size: int, start_sample: int = 0,
                     report: DataReport | None = None) -> DataPipeline:
    """This rank's infinite batch iterable from global position ``start_sample`` (samples consumed
    by all ranks so far). Sources and prompt caches are opened (and checked) here, before any
    worker starts; problems raise :class:`DataSourceError` naming the config key. ``report``:
    where the skip/convert events go (default: a new :class:`DataReport`, ``pipe.report``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if start_sample < 0:
        raise ValueError(f"start_sample must be >= 0, got {start_sample}")
    d = cfg.data
    if d.source in ("folder", "webdataset") and (d.resolution % (d.scale * LATENT_FACTOR)):
        raise DataSourceError(f"config key 'data.resolution': {d.resolution} must be a multiple of "
                              f"data.scale x {LATENT_FACTOR} = {d.scale * LATENT_FACTOR}")
    if not d.degrade_online and d.source in ("folder", "webdataset"):
        raise DataSourceError(f"config key 'data.degrade_online': false means training from cached "
                              f"pairs, but data.source={d.source!r}; use data.source='cached' with "
                              "shards from tools/prepare_data.py, or degrade_online=true")
    source = open_source(d)
    prompts = PromptStore(d.prompt_embeddings) if d.prompt_embeddings else None
    stream = SampleStream(cfg, rank, world_size, start_sample, source, prompts)
    pipe = DataPipeline(stream, d.num_workers, report)
    if rank == 0:  # tar samples without an image member: the dataset's, counted once
        for key in getattr(source, "no_image", ()):
            pipe.report.add("skipped_no_image", key)
    return pipe
