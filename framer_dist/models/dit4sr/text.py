"""SD3's three text encoders (the DiT4SR family's ``text_encoder``): prompts -> the embeddings the
transformer takes, for the prompt cache (``tools/encode_prompts.py``) and framer-sr.

For a prompt, as SD3/SD3.5 pipelines do: CLIP-L and CLIP-G run on 77 tokens; their penultimate
hidden states are concatenated on the channel axis (768 + 1280) and zero-padded to T5's width
(4096); T5-XXL's last hidden state (``t5_len`` tokens, 77 here by default) is appended on the token
axis -> ``prompt_embeds [77 + t5_len, 4096]``. ``pooled [2048]`` = CLIP-L and CLIP-G projected
text embeddings concatenated. Widths come from the models, so tiny test models work the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from framer_dist.data.captioning import ModelFolderError, check_model_folder

SD3_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


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

