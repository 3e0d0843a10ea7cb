"""Captions of LR images with LLaVA from a local folder (DiT4SR's prompt source).

Uses transformers' ``LlavaForConditionalGeneration`` + ``AutoProcessor`` (a llava-hf style
folder; nothing is downloaded). As in DiT4SR, sentences about focus, blur, depth of field or
position are dropped from the caption: they describe the degradation, not the content.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .io import InferenceError

QUESTION = "Describe this image and its style in a very detailed manner."
# Sentences mentioning these describe the LR degradation or the framing, not the content.
DROP_WORDS = ("focus", "focal", "prominent", "close-up", "black and white", "blur", "depth",
              "dense", "locate", "position")


def clean_caption(text: str, drop_words: tuple[str, ...] = DROP_WORDS) -> str:
    """Drop every sentence that mentions one of ``drop_words`` (case-insensitive)."""
    sentences = re.findall(r"[^.!?]+[.!?]?", text)
    kept = [s.strip() for s in sentences if s.strip() and not any(w in s.lower() for w in drop_words)]
    return " ".join(kept)


class LlavaCaptioner:
    def __init__(self, folder: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_new_tokens: int = 128):
        p = Path(folder)
        if not (p / "config.json").is_file():
            raise InferenceError(f"LLaVA folder not found or without config.json: {p} (expected a "
                                 "local llava-hf style model folder)")
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        try:
            self.processor = AutoProcessor.from_pretrained(p)
            self.model = LlavaForConditionalGeneration.from_pretrained(p, torch_dtype=dtype).to(device).eval()
        except (OSError, ValueError) as e:
            raise InferenceError(f"cannot load LLaVA from {p}: {e}") from None
        self.device, self.max_new_tokens = torch.device(device), max_new_tokens

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> str:
        from PIL import Image

        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = self.processor.apply_chat_template(conv, add_generation_prompt=True)
        inputs = self.processor(images=Image.fromarray(image), text=prompt, return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        text = self.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return clean_caption(text)
