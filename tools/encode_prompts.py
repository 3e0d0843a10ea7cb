#!/usr/bin/env python
"""Captions JSONL -> cached prompt embeddings (safetensors shards + the empty prompt), with the
model family's text encoder.

  python tools/encode_prompts.py --captions captions.jsonl --model /models/sd3.5-medium --out emb/

dit4sr (the default --family): prompt_embeds [77 + t5_len, 4096] (CLIP-L|CLIP-G penultimate states
padded to 4096, then T5) and pooled [2048]. Resumable (ids already encoded are skipped). Point
data.prompt_embeddings at --out.

For inference (framer-sr --prompt-embeddings): --inference appends framer-sr's default positive
suffix to every caption and encodes its default negative prompt (negative.safetensors), as
framer-sr does with text encoders; --suffix / --negative set others. Keep training and inference
caches in separate folders (a folder keeps the suffix it was started with).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from framer_dist.data.captioning import ModelFolderError
from framer_dist.data.text_encode import DTYPES, encode_captions
from framer_dist.models import DEFAULT_FAMILY, get_family


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", required=True, help="JSONL from tools/caption.py")
    ap.add_argument("--model", required=True,
                    help="local diffusers folder with the family's text encoder(s) (dit4sr: SD3/SD3.5)")
    ap.add_argument("--family", default=DEFAULT_FAMILY, help="model family whose text encoder to run")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--t5-len", type=int, default=77,
                    help="tokens of the family's long text stream (dit4sr: T5; prompt length = 77 + this)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=256, help="prompts per safetensors shard")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="stored dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=None, help="encode at most this many new captions")
    ap.add_argument("--inference", action="store_true",
                    help="an inference cache: framer-sr's default positive suffix and negative prompt")
    ap.add_argument("--suffix", default=None, help="appended to every caption (default: none; "
                    "with --inference framer-sr's)")
    ap.add_argument("--negative", default=None, help="negative prompt to encode (default: none; "
                    "with --inference framer-sr's)")
    a = ap.parse_args(argv)
    from framer_dist.infer.prompts import NEGATIVE_PROMPT, POSITIVE_SUFFIX
    suffix = a.suffix if a.suffix is not None else POSITIVE_SUFFIX if a.inference else ""
    negative = a.negative if a.negative is not None else NEGATIVE_PROMPT if a.inference else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
        enc = get_family(a.family).part("text_encoder")(a.model, a.device, run_dtype, a.t5_len)
        n = encode_captions(a.captions, a.out, enc, a.batch_size, a.shard_size, a.dtype, a.limit,
                            suffix=suffix, negative=negative)
    except (ModelFolderError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"encoded {n} prompts -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
