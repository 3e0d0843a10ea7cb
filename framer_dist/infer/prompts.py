"""Prompts for inference: where the text comes from, and how it becomes SD3 embeddings.

Text (one per image): a given ``--prompt``; a captions JSONL (one object per line with an image id
under ``id``/``image``/``file``/``name`` and the text under ``caption``/``prompt``/``text``; the id
matches the image file name or stem); or LLaVA from a local folder (see ``llava.py``). DiT4SR's
fixed positive suffix is appended and its negative prompt drives the unconditional CFG branch.

Embeddings: SD3's three text encoders from a local folder (``SD3TextEncoder``), or, for tiny test
models trained on random embeddings, ``HashedPromptEncoder`` (a fixed random embedding per text).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from .io import InferenceError

# The public DiT4SR release's defaults (its gradio demo; the negative prompt's missing comma
# between "chaotic" and "CG Style" is restored).
POSITIVE_SUFFIX = ("Cinematic, perfect without deformations, ultra HD, camera, detailed photo, "
                   "realistic maximum, 32k, Color.")
NEGATIVE_PROMPT = ("motion blur, noisy, dotted, pointed, deformed, lowres, chaotic, CG Style, "
                   "3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, "
                   "watermark, signature, jpeg artifacts.")

_ID_KEYS = ("id", "image", "file", "name", "image_id")
_TEXT_KEYS = ("caption", "prompt", "text")


def with_suffix(caption: str, suffix: str = POSITIVE_SUFFIX) -> str:
    """``caption`` + the positive suffix (just the suffix for an empty caption)."""
    caption = caption.strip()
    if not suffix:
        return caption
    return f"{caption} {suffix}" if caption else suffix


def read_captions(path: str | Path) -> dict[str, str]:
    """A captions JSONL as ``{id: text}``; ids are also indexed by their file stem."""
    p = Path(path)
    if not p.is_file():
        raise InferenceError(f"captions file not found: {p}")
    out: dict[str, str] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferenceError(f"{p}:{n}: not valid JSON: {e}") from None
        key = next((obj[k] for k in _ID_KEYS if k in obj), None)
        text = next((obj[k] for k in _TEXT_KEYS if k in obj), None)
        if key is None or text is None:
            raise InferenceError(f"{p}:{n}: expected an id ({'/'.join(_ID_KEYS)}) and a caption "
                                 f"({'/'.join(_TEXT_KEYS)}), got keys {sorted(obj)}")
        out[str(key)] = str(text)
        out.setdefault(Path(str(key)).stem, str(text))
    return out


def caption_for(image: Path, captions: dict[str, str]) -> str:
    for k in (image.name, image.stem):
        if k in captions:
            return captions[k]
    raise InferenceError(f"no caption for image {image.name} in the captions file "
                         f"(ids are matched by file name or stem)")


class PromptEncoder(Protocol):
    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """-> (prompt_embeds [B, T, joint_dim], pooled [B, pooled_dim])"""


class HashedPromptEncoder:
    """A fixed random embedding per text (seeded by its SHA-1): for tiny models without encoders.

    Not a language model: it only lets the pipeline and CFG run end to end with random weights.
    """

    def __init__(self, joint_dim: int, pooled_dim: int, tokens: int = 8):
        self.joint_dim, self.pooled_dim, self.tokens = joint_dim, pooled_dim, tokens

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        es, ps = [], []
        for text in prompts:
            seed = int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little") & (2 ** 63 - 1)
            g = torch.Generator().manual_seed(seed)
            es.append(torch.randn(self.tokens, self.joint_dim, generator=g))
            ps.append(torch.randn(self.pooled_dim, generator=g))
        return torch.stack(es), torch.stack(ps)


class SD3TextEncoder:
    """SD3's prompt encoding with CLIP-L, CLIP-G and T5-XXL from a local diffusers folder.

    ``prompt_embeds`` = [CLIP-L | CLIP-G penultimate hidden states, zero-padded to the T5 width]
    followed by the T5 tokens along the sequence; ``pooled`` = [CLIP-L | CLIP-G] text embeddings.
    Without ``text_encoder_3`` the T5 part is zeros (as SD3 allows).
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, t5_tokens: int = 256):
        from transformers import (AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel)

        root = Path(folder)
        need = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
        missing = [n for n in need if not (root / n).is_dir()]
        if missing:
            raise InferenceError(f"text encoder folder {root} lacks {', '.join(missing)} (expected "
                                 "the SD3/SD3.5 diffusers layout: text_encoder, text_encoder_2, "
                                 "text_encoder_3 and their tokenizers)")
        self.device, self.dtype, self.t5_tokens = torch.device(device), dtype, t5_tokens
        self.clips = [(AutoTokenizer.from_pretrained(root / t),
                       CLIPTextModelWithProjection.from_pretrained(root / e, torch_dtype=dtype).to(self.device).eval())
                      for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))]
        self.t5 = None
        if (root / "text_encoder_3").is_dir() and (root / "tokenizer_3").is_dir():
            self.t5 = (AutoTokenizer.from_pretrained(root / "tokenizer_3"),
                       T5EncoderModel.from_pretrained(root / "text_encoder_3", torch_dtype=dtype).to(self.device).eval())
        self.joint_dim = self.t5[1].config.d_model if self.t5 else 4096

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        hidden, pooled = [], []
        for tok, enc in self.clips:
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        if self.t5 is not None:
            tok, enc = self.t5
            ids = tok(prompts, padding="max_length", max_length=self.t5_tokens, truncation=True,
                      add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
            t5 = enc(ids)[0]
        else:
            t5 = torch.zeros(len(prompts), self.t5_tokens, self.joint_dim, device=self.device, dtype=clip.dtype)
        return torch.cat([clip, t5.to(clip.dtype)], dim=1), torch.cat(pooled, dim=-1)


class CachedEmbeddings:
    """Precomputed prompt embeddings (safetensors with ``prompt_embeds`` [1|B, T, D], ``pooled``).

    ``path`` is one file used for every image, or a folder of ``<image stem>.safetensors``. The
    unconditional (negative-prompt) branch reads ``negative.safetensors`` next to them (or the
    keys ``negative_prompt_embeds`` / ``negative_pooled`` of the single file).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise InferenceError(f"prompt embeddings not found: {self.path}")

    @staticmethod
    def _read(f: Path, keys: tuple[str, str] = ("prompt_embeds", "pooled")) -> tuple[Tensor, Tensor]:
        from safetensors.torch import load_file

        if not f.is_file():
            raise InferenceError(f"prompt embedding file not found: {f}")
        try:
            sd = load_file(f)
        except Exception as e:  # safetensors raises its own error types
            raise InferenceError(f"cannot read prompt embeddings {f}: {e}") from None
        if keys[0] not in sd or keys[1] not in sd:
            raise InferenceError(f"{f} lacks '{keys[0]}'/'{keys[1]}' (has {sorted(sd)})")
        e, p = sd[keys[0]], sd[keys[1]]
        return (e[None] if e.ndim == 2 else e), (p[None] if p.ndim == 1 else p)

    def cond_for(self, image: Path) -> tuple[Tensor, Tensor]:
        if self.path.is_file():
            return self._read(self.path)
        return self._read(self.path / f"{image.stem}.safetensors")

    def uncond(self) -> tuple[Tensor, Tensor]:
        if self.path.is_file():
            return self._read(self.path, ("negative_prompt_embeds", "negative_pooled"))
        return self._read(self.path / "negative.safetensors")
