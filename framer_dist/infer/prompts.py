"""Prompts for inference: where the text comes from, and how it becomes embeddings.

Text (one per image): a given ``--prompt``; a captions JSONL (one object per line with an image id
under ``id``/``image``/``file``/``name``/``image_id`` and the text under
``caption``/``prompt``/``text``; the id matches the image file name or stem); or LLaVA from a local folder (``framer_dist.data.captioning``, the training captioner). DiT4SR's
fixed positive suffix is appended and its negative prompt drives the unconditional CFG branch.

Embeddings: the model family's text encoder from a local folder (``text_encoder``; the one
``tools/encode_prompts.py`` writes the training cache with), embeddings cached by that tool
(``CachedEmbeddings``), or, for tiny test models trained on random embeddings,
``HashedPromptEncoder`` (a fixed random embedding per text).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

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
    from framer_dist.data.prompts import join_suffix

    return join_suffix(caption, suffix)


def read_captions(path: str | Path) -> dict[str, str]:
    """A captions JSONL as ``{id: text}`` (``framer_dist.data.captions``'s reader and rules, with
    the id and text keys above); ids are also indexed by their file stem."""
    from framer_dist.data.captions import CaptionsError, read_captions as read_jsonl

    try:
        caps = read_jsonl(path, id_keys=_ID_KEYS, caption_keys=_TEXT_KEYS)
    except CaptionsError as e:
        raise InferenceError(str(e)) from None
    out = dict(caps)
    for key, text in caps.items():
        out.setdefault(Path(key).stem, text)
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


def text_encoder(family: Any, folder: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> PromptEncoder:
    """``family``'s text encoder (``ModelFamily.text_encoder``) from a local folder: the one that
    wrote the training cache, so train and test prompts match."""
    from framer_dist.config import ConfigError
    from framer_dist.data.captioning import ModelFolderError

    try:
        return family.part("text_encoder")(folder, str(device), dtype, None)
    except ConfigError as e:
        raise InferenceError(str(e)) from None
    except ModelFolderError as e:
        raise InferenceError(str(e).replace("--model", "--text-encoders")) from None


class CachedEmbeddings:
    """Prompt embeddings cached by ``tools/encode_prompts.py`` (``framer_dist.data.prompts``
    layout: ``prompts-*.safetensors`` keyed by image id + ``empty.safetensors``).

    An image's id is its file name or stem. The unconditional branch uses
    ``negative.safetensors`` in the same folder if present (same keys as ``empty.safetensors``),
    else the cached empty prompt.
    """

    def __init__(self, folder: str | Path):
        from framer_dist.data.prompts import PromptStore
        from framer_dist.data.sources import DataSourceError

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InferenceError(f"--prompt-embeddings folder not found: {self.folder}")
        try:
            self.store = PromptStore(self.folder)
        except DataSourceError as e:
            raise InferenceError(str(e).replace("config key 'data.prompt_embeddings'",
                                                "--prompt-embeddings")) from None

    def cond_for(self, image: Path) -> tuple[Tensor, Tensor]:
        for key in (image.name, image.stem):
            got = self.store.get(key)
            if got is not None:
                return got[0][None].float(), got[1][None].float()
        raise InferenceError(f"no cached prompt embedding for image {image.name} (ids tried: "
                             f"{image.name}, {image.stem}) in {self.folder}")

    def uncond(self) -> tuple[Tensor, Tensor]:
        from framer_dist.data.prompts import NEGATIVE_FILE

        neg = self.folder / NEGATIVE_FILE
        if neg.is_file():
            from safetensors.torch import load_file

            sd = load_file(neg)
            return sd["prompt_embeds"][None].float(), sd["pooled"][None].float()
        e, p = self.store.empty
        return e[None].float(), p[None].float()
