"""Captions -> cached prompt embeddings (the logic behind ``tools/encode_prompts.py``).

The encoder is the model family's (``ModelFamily.text_encoder``, e.g. SD3's CLIP-L + CLIP-G + T5
for dit4sr): any callable ``prompts -> (prompt_embeds [B, T, D], pooled [B, P])``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from .captions import read_captions
from ..atomic import write_text_atomic
from .prompts import (EMPTY_FILE, ENCODING_FILE, NEGATIVE_FILE, SHARD_GLOB, done_ids, join_suffix,
                      write_empty, write_shard)

log = logging.getLogger("framer_dist.data")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _check_encoding(out: Path, suffix: str) -> None:
    """A folder keeps one suffix: a resumed run with another would mix two kinds of prompt."""
    f = out / ENCODING_FILE
    had = json.loads(f.read_text())["suffix"] if f.is_file() else ("" if done_ids(out) else None)
    if had is None:
        if suffix:
            write_text_atomic(f, json.dumps({"suffix": suffix}) + "\n")
    elif had != suffix:
        raise ValueError(f"--out {out} holds prompts encoded with suffix {had!r}, this run appends "
                         f"{suffix!r}: use another --out (training caches take the captions as "
                         "they are, inference caches the positive suffix)")


def encode_captions(captions: str | Path, out_dir: str | Path, encoder, batch_size: int = 16,
                    shard_size: int = 256, dtype: str = "bf16", limit: int | None = None,
                    suffix: str = "", negative: str | None = None) -> int:
    """Encode every caption not yet cached in ``out_dir`` (+ the empty prompt once); returns the
    number encoded now. Each shard is written atomically, so an interruption loses at most the
    shard in progress and a re-run continues after the last complete one.

    For an inference cache: ``suffix`` is appended to every caption (framer-sr's positive suffix) and
    ``negative`` is encoded to ``negative.safetensors`` (the unconditional CFG branch)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    texts = read_captions(captions)     # a bad file fails before anything is encoded or written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    _check_encoding(out, suffix)
    dt = DTYPES[dtype]
    if not (out / EMPTY_FILE).is_file():
        e, p = encoder([""])
        write_empty(out, e[0].to(dt), p[0].to(dt))
    if negative is not None:
        e, p = encoder([negative])
        write_empty(out, e[0].to(dt), p[0].to(dt), NEGATIVE_FILE)
    done = done_ids(out)
    todo = [(i, join_suffix(c, suffix) if suffix else c) for i, c in texts.items() if i not in done]
    if limit is not None:
        todo = todo[:limit]
    nums = [int(m.group(1)) for q in out.glob(SHARD_GLOB) if (m := re.search(r"(\d+)", q.stem))]
    k = max(nums) + 1 if nums else 0
    n = 0
    for s in range(0, len(todo), shard_size):
        chunk = todo[s:s + shard_size]
        embeds, pooled = [], []
        for b in range(0, len(chunk), batch_size):
            e, p = encoder([c for _, c in chunk[b:b + batch_size]])
            embeds.append(e.to(dt).cpu())
            pooled.append(p.to(dt).cpu())
        write_shard(out / f"prompts-{k:05d}.safetensors", [i for i, _ in chunk],
                    torch.cat(embeds), torch.cat(pooled))
        k += 1
        n += len(chunk)
        log.info("encoded %d/%d prompts", n, len(todo))
    return n
