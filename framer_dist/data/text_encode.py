"""SD3's three text encoders -> cached prompt embeddings (the logic behind
``tools/encode_prompts.py``).

For a prompt, as SD3/SD3.5 pipelines do: CLIP-L and CLIP-G run on 77 tokens; their penultimate
hidden states are concatenated on the channel axis (768 + 1280) and zero-padded to T5's width
(4096); T5-XXL's last hidden state (``t5_len`` tokens, 77 here by default) is appended on the token
axis -> ``prompt_embeds [77 + t5_len, 4096]``. ``pooled [2048]`` = CLIP-L and CLIP-G projected
text embeddings concatenated. Widths come from the models, so tiny test models work the same way.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .captioning import ModelFolderError, check_model_folder
from .captions import read_captions
from ..atomic import write_text_atomic
from .prompts import (EMPTY_FILE, ENCODING_FILE, NEGATIVE_FILE, SHARD_GLOB, done_ids, join_suffix,
                      write_empty, write_shard)

log = logging.getLogger("framer_dist.data")

SD3_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class SD3TextEncoders:
    """CLIP-L, CLIP-G and T5 from a local SD3/SD3.5 diffusers folder."""

    def __init__(self, folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 t5_len: int = 77, clip_len: int = 77) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        root = check_model_folder(folder, "--model", need=())
        missing = [p for p in SD3_PARTS if not (root / p).is_dir()]
        if missing:
            raise ModelFolderError(f"--model: {root} is not an SD3/SD3.5 folder with all three text "
                                   f"encoders (missing {', '.join(missing)})")
        for p in SD3_PARTS[:3]:
            check_model_folder(root / p, "--model", need=("config.json",))
        self.tok = [AutoTokenizer.from_pretrained(str(root / p)) for p in SD3_PARTS[3:]]
        self.clip = [CLIPTextModelWithProjection.from_pretrained(str(root / p), dtype=dtype).to(device).eval()
                     for p in SD3_PARTS[:2]]
        self.t5 = T5EncoderModel.from_pretrained(str(root / "text_encoder_3"), dtype=dtype).to(device).eval()
        self.device, self.t5_len, self.clip_len = device, t5_len, clip_len

    def _ids(self, tok, prompts: list[str], length: int) -> torch.Tensor:
        return tok(prompts, padding="max_length", max_length=length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], []
        for tok, model in zip(self.tok[:2], self.clip):
            out = model(self._ids(tok, prompts, self.clip_len), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = self.t5(self._ids(self.tok[2], prompts, self.t5_len)).last_hidden_state
        clip = torch.cat(hidden, -1)
        if clip.shape[-1] > t5.shape[-1]:
            raise ValueError(f"CLIP width {clip.shape[-1]} exceeds the T5 width {t5.shape[-1]}")
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, -1)


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
                         "they are, inference caches DiT4SR's suffix)")


def encode_captions(captions: str | Path, out_dir: str | Path, encoder, batch_size: int = 16,
                    shard_size: int = 256, dtype: str = "bf16", limit: int | None = None,
                    suffix: str = "", negative: str | None = None) -> int:
    """Encode every caption not yet cached in ``out_dir`` (+ the empty prompt once); returns the
    number encoded now. Each shard is written atomically, so an interruption loses at most the
    shard in progress and a re-run continues after the last complete one.

    For an inference cache: ``suffix`` is appended to every caption (DiT4SR's positive suffix) and
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
