"""Random-access sample sources: an HR image folder, WebDataset tar shards, cached-pair shards.

Each source has a fixed, sorted list of items (so every rank and worker sees the same order) and
``len()``; ``read(i)`` returns the raw item. Random access is what lets the loader follow one
seeded global permutation per epoch regardless of the number of ranks or workers.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open

from .images import IMAGE_EXTS


class DataSourceError(ValueError):
    """A data source cannot be opened; the message names the config key and the path."""


class FolderSource:
    """HR images under a folder (recursive); id = path relative to the folder, without suffix."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataSourceError(f"config key 'data.path': image folder not found: {self.root}")
        files = [p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        self.files = sorted(files, key=lambda p: p.relative_to(self.root).as_posix())
        if not self.files:
            raise DataSourceError(f"config key 'data.path': no images ({', '.join(IMAGE_EXTS)}) "
                                  f"under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def item_id(self, i: int) -> str:
        return self.files[i].relative_to(self.root).with_suffix("").as_posix()

    def describe(self, i: int) -> str:
        """Where item ``i`` is, for messages: its file."""
        return str(self.files[i])

    def read(self, i: int) -> bytes:
        return self.files[i].read_bytes()


def expand_shards(pattern: str) -> list[str]:
    """``a-{000..009}.tar`` brace ranges, then globs; sorted and de-duplicated."""
    out = [pattern]
    rx = re.compile(r"\{(\d+)\.\.(\d+)\}")
    while any(rx.search(p) for p in out):
        nxt = []
        for p in out:
            m = rx.search(p)
            if not m:
                nxt.append(p)
                continue
            lo, hi = m.group(1), m.group(2)
            for n in range(int(lo), int(hi) + 1):
                nxt.append(p[:m.start()] + str(n).zfill(len(lo)) + p[m.end():])
        out = nxt
    files: list[str] = []
    for p in out:
        files.extend(sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])
    return sorted(dict.fromkeys(files))


class TarSource:
    """WebDataset-style tar shards: members sharing a key (path up to the first dot of the file
    name) form a sample; its image is the first member with an image extension. Member offsets are
    indexed once at start-up, so reads are random access (seek + read). Each process keeps at
    most ``MAX_OPEN`` shards open (least recently used closed first): a permutation touches every
    shard, and one handle per shard would exhaust the file-descriptor limit (``ulimit -n``) with
    thousands of shards, turning every later read into a skipped item."""

    MAX_OPEN = 32

    def __init__(self, pattern: str) -> None:
        shards = expand_shards(pattern)
        missing = [s for s in shards if not os.path.isfile(s)]
        if not shards or missing:
            raise DataSourceError(f"config key 'data.path': tar shard(s) not found for {pattern!r}: "
                                  f"{', '.join(missing[:3]) or 'no match'}")
        self.items: list[tuple[str, int, int, str]] = []      # (shard, offset, size, key)
        self.members: list[str] = []      # the image member's name in its shard, per item
        self.no_image: list[str] = []     # sample keys with no image member (reported, not used)
        for shard in shards:
            try:
                with tarfile.open(shard, "r:") as tf:
                    seen: set[str] = set()
                    exts: dict[str, list[str]] = {}
                    for m in tf:
                        if not m.isfile():
                            continue
                        d, base = os.path.split(m.name)
                        key = os.path.join(d, base.split(".", 1)[0])
                        ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
                        exts.setdefault(key, []).append(ext)
                        if ext in IMAGE_EXTS and key not in seen:
                            seen.add(key)
                            self.items.append((shard, m.offset_data, m.size, key))
                            self.members.append(m.name)
                    self.no_image.extend(f"{shard}:{k} (members {', '.join(e or '(none)' for e in v)})"
                                         for k, v in exts.items() if k not in seen)
            except (tarfile.TarError, OSError) as e:
                raise DataSourceError(f"config key 'data.path': {shard} is not a readable "
                                      f"uncompressed tar: {e}") from None
        if not self.items:
            raise DataSourceError(f"config key 'data.path': no images in the shards {pattern!r}")
        self._fh: OrderedDict[str, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self.items)

    def item_id(self, i: int) -> str:
        return self.items[i][3]

    def describe(self, i: int) -> str:
        """Where item ``i`` is, for messages: ``<shard>:<member>``."""
        return f"{self.items[i][0]}:{self.members[i]}"

    def read(self, i: int) -> bytes:
        shard, off, size, _ = self.items[i]
        fh = self._fh.get(shard)
        if fh is None:
            while len(self._fh) >= self.MAX_OPEN:
                self._fh.popitem(last=False)[1].close()
            fh = self._fh[shard] = open(shard, "rb")  # noqa: SIM115 - kept open per worker
        else:
            self._fh.move_to_end(shard)
        fh.seek(off)
        return fh.read(size)

    def __getstate__(self) -> dict:  # file handles do not cross process boundaries
        st = dict(self.__dict__)
        st["_fh"] = OrderedDict()
        return st


CACHE_KEYS = ("hr_latent", "lr_latent")
MANIFEST = "manifest.json"  # tools/prepare_data.py's parameters (framer_dist.data.prepare)
LATENT_FACTOR = 8


def check_cache_manifest(root: str | Path, resolution: int, scale: int) -> None:
    """``data.resolution`` / ``data.scale`` must be what the cache was prepared with: its latents
    are fixed (the trainer would otherwise silently train at the cache's size and degradation
    while the run's config, logs and FLOP counts say another). A cache without a manifest is
    checked by its latent shape in :class:`CachedSource` only."""
    m = Path(root) / MANIFEST
    if not m.is_file():
        return
    try:
        params = json.loads(m.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataSourceError(f"config key 'data.path': {m} is not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise DataSourceError(f"config key 'data.path': {m} is not a prepare_data manifest "
                              "(a JSON object)")
    wrong = [(k, v, params[k]) for k, v in (("resolution", resolution), ("scale", scale))
             if k in params and params[k] != v]
    if wrong:
        have = ", ".join(f"data.{k}={v}" for k, v, _ in wrong)
        made = ", ".join(f"{k}={c}" for k, _, c in wrong)
        fix = " ".join(f"data.{k}={c}" for k, _, c in wrong)
        raise DataSourceError(
            f"config key '{'/'.join('data.' + k for k, _, _ in wrong)}': this run has {have}, but "
            f"the cached pairs in {root} were prepared with {made} ({m}); set {fix} or prepare a "
            f"cache for this run (tools/prepare_data.py {' '.join(f'--{k} {v}' for k, v, _ in wrong)})")


class CachedSource:
    """Cached-pair shards written by ``tools/prepare_data.py``: ``*.safetensors`` files holding
    ``hr_latent``/``lr_latent`` ``[n, C, h, w]`` and metadata ``ids`` (JSON list, one per row,
    ``<image id>#<pass>``). With ``resolution``/``scale`` (the run's ``data.*``) the cache's
    ``manifest.json`` and latent sizes must agree with them."""

    def __init__(self, root: str | Path, resolution: int | None = None,
                 scale: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataSourceError(f"config key 'data.path': cache folder not found: {self.root}")
        if resolution is not None and scale is not None:
            check_cache_manifest(self.root, resolution, scale)
        self.shards = sorted(p for p in self.root.glob("*.safetensors"))
        if not self.shards:
            raise DataSourceError(f"config key 'data.path': no cached-pair shards (*.safetensors) "
                                  f"in {self.root}; write them with tools/prepare_data.py")
        self.rows: list[tuple[int, int]] = []
        self.ids: list[str] = []
        for si, p in enumerate(self.shards):
            try:
                with safe_open(str(p), "pt") as f:
                    meta = f.metadata() or {}
                    keys = set(f.keys())
                    if not set(CACHE_KEYS) <= keys or "ids" not in meta:
                        raise DataSourceError(f"config key 'data.path': {p} is not a cached-pair "
                                              f"shard (needs tensors {CACHE_KEYS} and metadata 'ids')")
                    ids = json.loads(meta["ids"])
                    hw = f.get_slice("hr_latent").get_shape()[-2:]
            except DataSourceError:
                raise
            except Exception as e:  # SafetensorError (truncated/partial copy), OSError, bad JSON
                raise DataSourceError(f"config key 'data.path': {p} is not a readable cached-pair "
                                      f"shard ({type(e).__name__}: {e}); delete it and re-run "
                                      "tools/prepare_data.py, which rewrites missing shards") from None
            if resolution is not None and list(hw) != [resolution // LATENT_FACTOR] * 2:
                raise DataSourceError(
                    f"config key 'data.resolution': {resolution} needs latents of "
                    f"{resolution // LATENT_FACTOR}x{resolution // LATENT_FACTOR}, but {p} holds "
                    f"{hw[0]}x{hw[1]} ({hw[0] * LATENT_FACTOR} px crops); set data.resolution to "
                    "the cache's crop size")
            self.ids.extend(ids)
            self.rows.extend((si, r) for r in range(len(ids)))

    def __len__(self) -> int:
        return len(self.rows)

    def item_id(self, i: int) -> str:
        return self.ids[i].split("#", 1)[0]

    def describe(self, i: int) -> str:
        """Where item ``i`` is, for messages: ``<shard> row <r>``."""
        si, r = self.rows[i]
        return f"{self.shards[si]} row {r}"

    def read(self, i: int) -> dict[str, torch.Tensor]:
        si, r = self.rows[i]
        with safe_open(str(self.shards[si]), "pt") as f:
            return {k: f.get_slice(k)[r:r + 1][0] for k in CACHE_KEYS}
