"""LLaVA captions for HR images (the logic behind ``tools/caption.py``).

Reads a folder or WebDataset tar shards, captions images in batches with transformers' LLaVA
classes loaded from a local folder, and appends ``{"id": ..., "caption": ...}`` lines to a JSONL
file, flushed after every batch. Resumable: ids already in the output are skipped (a last line cut
off by an interruption is removed and its image captioned again; any other damaged line is an
error naming it, :mod:`.captions`). An id is written once: a second image with the same id (a
folder's ``a.png`` and ``a.jpg``) is reported as ``skipped_duplicate_id``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .captions import read_captions
from .images import DataReport, ImageSkipped, decode, where
from .sources import FolderSource, TarSource

log = logging.getLogger("framer_dist.data")

# What SUPIR/DiT4SR ask LLaVA, and the words whose sentences DiT4SR drops from a caption
# (they describe the photo's optics or layout rather than its content).
DEFAULT_INSTRUCTION = "Describe this image and its style in a very detailed manner."
DIT4SR_BANNED_WORDS = ("focus", "focal", "prominent", "close-up", "black and white", "blur",
                       "depth", "dense", "locate", "position")


class ModelFolderError(FileNotFoundError):
    """A local model folder is missing or incomplete; the message names the option and path."""


def filter_sentences(text: str, banned: Iterable[str] = DIT4SR_BANNED_WORDS) -> str:
    """Drop every sentence (split after . ? !) that contains a banned word (case-insensitive)."""
    pieces = re.split(r"(?<=[.?!])", text)
    keep = [s for s in pieces if s.strip() and not any(w.lower() in s.lower() for w in banned)]
    return "".join(keep).strip()


def read_done(path: str | Path) -> dict[str, str]:
    """Captions already in an output JSONL (none before the first run): :func:`.read_captions`,
    so a damaged line is a :class:`.CaptionsError`. A last line cut off by an interruption is
    one too: :func:`caption_images` removes it (:func:`_drop_partial_line`) before reading."""
    p = Path(path)
    return read_captions(p) if p.is_file() else {}


def _drop_partial_line(path: Path) -> None:
    """Cut a last line left without its newline by an interruption (else the next record would be
    appended to it and lost). Even a complete JSON object without its newline goes: it may be
    cut inside its caption's text."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def open_images(path: str) -> FolderSource | TarSource:
    """A folder, or tar shards (a ``.tar`` path, brace range or glob)."""
    if Path(path).is_dir():
        return FolderSource(path)
    return TarSource(path)


def check_model_folder(folder: str | Path, option: str, need: Iterable[str] = ("config.json",)) -> Path:
    p = Path(folder)
    if not p.is_dir():
        raise ModelFolderError(f"{option}: model folder not found: {p}")
    missing = [n for n in need if not (p / n).exists()]
    if missing:
        raise ModelFolderError(f"{option}: {p} is not a complete model folder (missing "
                               f"{', '.join(missing)})")
    return p


class LlavaCaptioner:
    """Batched greedy captioning with a local LLaVA checkpoint."""

    def __init__(self, folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 instruction: str = DEFAULT_INSTRUCTION, max_new_tokens: int = 128) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        p = check_model_folder(folder, "--model")
        self.processor = AutoProcessor.from_pretrained(str(p))
        self.processor.tokenizer.padding_side = "left"       # generation appends on the right
        self.model = LlavaForConditionalGeneration.from_pretrained(str(p), dtype=dtype).to(device).eval()
        self.device, self.dtype = device, dtype
        self.instruction, self.max_new_tokens = instruction, max_new_tokens
        self.prompt = self._prompt()

    def _prompt(self) -> str:
        conv = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": self.instruction}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(conv, add_generation_prompt=True)
        return f"USER: <image>\n{self.instruction} ASSISTANT:"        # LLaVA-1.5 format

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, text=[self.prompt] * len(images),
                                return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


def caption_images(images: str, out: str | Path, captioner: Callable[[list[Image.Image]], list[str]],
                   batch_size: int = 8, filter_words: Iterable[str] | None = DIT4SR_BANNED_WORDS,
                   limit: int | None = None, report: DataReport | None = None) -> int:
    """Caption every image of ``images`` not yet in ``out``; returns how many were captioned now.

    ``limit`` stops after that many new captions (to split work; the next call continues).
    """
    src = open_images(images)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    _drop_partial_line(Path(out))       # before reading: a cut-off line is redone, not an error
    done = read_done(out)
    todo = [i for i in range(len(src)) if src.item_id(i) not in done]
    if limit is not None:
        todo = todo[:limit]
    report = report or DataReport()
    first: dict[str, str] = {}          # id -> where its image is, for this run's duplicates
    n = 0
    with open(out, "a", encoding="utf-8") as fh:
        for s in range(0, len(todo), batch_size):
            ids, imgs = [], []
            for i in todo[s:s + batch_size]:
                item = src.item_id(i)
                if item in first:       # one caption per id: readers refuse an id twice
                    report.add("skipped_duplicate_id", where(src, i),
                               f"id {item!r} is also {first[item]}, captioned once")
                    continue
                try:
                    arr, conv = decode(src.read(i), item)
                except ImageSkipped as e:
                    report.add(e.kind, where(src, i), str(e))
                    continue
                first[item] = where(src, i)
                ids.append(item)
                imgs.append(Image.fromarray(np.ascontiguousarray(arr)))
            if not imgs:
                continue
            caps = captioner(imgs)
            for item, cap in zip(ids, caps):
                if filter_words is not None:
                    cap = filter_sentences(cap, filter_words)
                fh.write(json.dumps({"id": item, "caption": cap}, ensure_ascii=False) + "\n")
            fh.flush()
            n += len(ids)
            log.info("captioned %d/%d", n, len(todo))
    return n
