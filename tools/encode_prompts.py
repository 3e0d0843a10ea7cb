#!/usr/bin/env python
"""Captions JSONL -> cached SD3 prompt embeddings (safetensors shards + the empty prompt).

  python tools/encode_prompts.py --captions captions.jsonl --model /models/sd3.5-medium --out emb/

prompt_embeds [77 + t5_len, 4096] (CLIP-L|CLIP-G penultimate states padded to 4096, then T5) and
pooled [2048]; resumable (ids already encoded are skipped). Point data.prompt_embeddings at --out.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from framer_dist.data.captioning import ModelFolderError
from framer_dist.data.text_encode import DTYPES, SD3TextEncoders, encode_captions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", required=True, help="JSONL from tools/caption.py")
    ap.add_argument("--model", required=True, help="local SD3/SD3.5 diffusers folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--t5-len", type=int, default=77, help="T5 tokens (prompt length = 77 + this)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=256, help="prompts per safetensors shard")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="stored dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=None, help="encode at most this many new captions")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
        enc = SD3TextEncoders(a.model, a.device, run_dtype, t5_len=a.t5_len)
        n = encode_captions(a.captions, a.out, enc, a.batch_size, a.shard_size, a.dtype, a.limit)
    except (ModelFolderError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"encoded {n} prompts -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
