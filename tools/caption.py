#!/usr/bin/env python
"""Caption HR images with a local LLaVA checkpoint -> JSONL keyed by image id (resumable).

  python tools/caption.py --images data/hr --model /models/llava-1.5-7b-hf --out captions.jsonl
  python tools/caption.py --images 'shards/train-{000..099}.tar' --model ... --out ... --no-filter

Re-running continues where it stopped (ids already in --out are skipped).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from framer_dist.data.captions import CaptionsError
from framer_dist.data.captioning import (DEFAULT_INSTRUCTION, DIT4SR_BANNED_WORDS, LlavaCaptioner,
                                         ModelFolderError, caption_images)
from framer_dist.data.images import DataReport
from framer_dist.data.sources import DataSourceError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="image folder (recursive) or tar shard pattern")
    ap.add_argument("--model", required=True, help="local LLaVA folder (transformers format)")
    ap.add_argument("--out", required=True, help="output JSONL ({'id', 'caption'} per line)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="the question asked per image")
    ap.add_argument("--no-filter", action="store_true",
                    help="keep sentences with DiT4SR's banned words (" + ", ".join(DIT4SR_BANNED_WORDS) + ")")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--limit", type=int, default=None, help="look at most this many not-yet-captioned images")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cap = LlavaCaptioner(a.model, a.device, DTYPES[a.dtype], a.instruction, a.max_new_tokens)
        report = DataReport()
        n = caption_images(a.images, a.out, cap, a.batch_size,
                           None if a.no_filter else DIT4SR_BANNED_WORDS, a.limit, report)
    except (ModelFolderError, DataSourceError, CaptionsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"captioned {n} images -> {a.out}; {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
