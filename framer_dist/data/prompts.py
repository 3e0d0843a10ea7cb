"""Cached prompt embeddings: the on-disk format and the per-sample lookup.

A prompt-embedding folder (written by ``tools/encode_prompts.py``) holds

- ``prompts-NNNNN.safetensors``: ``prompt_embeds [n, T, D]``, ``pooled [n, P]``, metadata
  ``ids`` = JSON list of the n image ids (one shard per encoding chunk; a shard is complete
  once it exists: it is written to a temporary name and renamed);
- ``empty.safetensors``: ``prompt_embeds [T, D]``, ``pooled [P]`` of the empty prompt;
- for inference only (``tools/encode_prompts.py --inference``): ``negative.safetensors`` (same
  keys, the negative prompt of the unconditional CFG branch) and ``encoding.json`` (the suffix
  appended to every caption, so a folder never mixes captions with and without it).

A sample uses the empty prompt with probability ``data.null_prompt_prob`` (drawn from its seed)
and when its id has no cached embedding (counted as ``missing_prompt``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..atomic import save_safetensors_atomic
from .sources import DataSourceError

EMPTY_FILE = "empty.safetensors"
NEGATIVE_FILE = "negative.safetensors"
ENCODING_FILE = "encoding.json"
SHARD_GLOB = "prompts-*.safetensors"


def join_suffix(caption: str, suffix: str) -> str:
    """``caption`` + a fixed suffix (just the suffix for an empty caption; the caption alone for
    an empty suffix)."""
    caption = caption.strip()
    if not suffix:
        return caption
    return f"{caption} {suffix}" if caption else suffix


def write_shard(path: str | Path, ids: list[str], prompt_embeds: torch.Tensor,
                pooled: torch.Tensor) -> None:
    """Atomically write one shard (tmp + rename: a crash never leaves a half shard)."""
    save_safetensors_atomic({"prompt_embeds": prompt_embeds, "pooled": pooled}, path,
                            metadata={"ids": json.dumps(ids)})


def write_empty(folder: str | Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                name: str = EMPTY_FILE) -> None:
    """One prompt's embeddings (the empty prompt, or ``NEGATIVE_FILE``'s negative prompt)."""
    save_safetensors_atomic({"prompt_embeds": prompt_embeds, "pooled": pooled}, Path(folder) / name)


def done_ids(folder: str | Path) -> set[str]:
    """Ids that already have a cached embedding (for resuming the encoder)."""
    out: set[str] = set()
    for p in sorted(Path(folder).glob(SHARD_GLOB)):
        with safe_open(str(p), "pt") as f:
            out.update(json.loads((f.metadata() or {}).get("ids", "[]")))
    return out


class PromptStore:
    """Lookup of cached embeddings by image id (opened lazily in each worker)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / EMPTY_FILE).is_file():
            raise DataSourceError(f"config key 'data.prompt_embeddings': {self.folder} has no "
                                  f"{EMPTY_FILE}; write it with tools/encode_prompts.py")
        self.index: dict[str, tuple[str, int]] = {}
        key = "config key 'data.prompt_embeddings'"
        try:
            with safe_open(str(self.folder / EMPTY_FILE), "pt") as f:
                self.empty = (f.get_tensor("prompt_embeds"), f.get_tensor("pooled"))
        except Exception as e:  # SafetensorError (truncated copy), missing tensor
            raise DataSourceError(f"{key}: {self.folder / EMPTY_FILE} is not readable "
                                  f"({type(e).__name__}: {e})") from None
        want = (list(self.empty[0].shape), list(self.empty[1].shape))
        for p in sorted(self.folder.glob(SHARD_GLOB)):
            try:
                with safe_open(str(p), "pt") as f:
                    ids = json.loads((f.metadata() or {}).get("ids", "[]"))
                    got = (f.get_slice("prompt_embeds").get_shape()[1:],
                           f.get_slice("pooled").get_shape()[1:])
            except Exception as e:  # SafetensorError (truncated copy), missing tensor, bad JSON
                raise DataSourceError(f"{key}: {p} is not a readable prompt shard "
                                      f"({type(e).__name__}: {e})") from None
            # every row must stack with the empty prompt's shape (batches mix them)
            if got != want:
                raise DataSourceError(f"{key}: {p} holds prompt_embeds {got[0]} / pooled {got[1]} "
                                      f"per row, but {EMPTY_FILE} is {want[0]} / {want[1]} (encoded "
                                      "with another --t5-len or model?); one folder, one encoding")
            for row, i in enumerate(ids):
                self.index[i] = (str(p), row)

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(self.empty[0].shape), tuple(self.empty[1].shape)

    def get(self, item_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        loc = self.index.get(item_id)
        if loc is None:
            return None
        with safe_open(loc[0], "pt") as f:
            return f.get_slice("prompt_embeds")[loc[1]:loc[1] + 1][0], f.get_slice("pooled")[loc[1]:loc[1] + 1][0]


def random_prompt(seed: int, length: int, dim: int, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random embeddings (synthetic data and runs without cached prompts)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(length, dim, generator=g), torch.randn(pooled_dim, generator=g)


def use_null_prompt(sample_seed: int, prob: float) -> bool:
    return bool(np.random.default_rng([sample_seed, 0x0E]).uniform() < prob)
