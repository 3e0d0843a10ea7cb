"""SD2.1's text encoder (the pisasr family's ``text_encoder``): prompts -> the U-Net's
``encoder_hidden_states``, for the prompt cache (``tools/encode_prompts.py``) and framer-sr.

As diffusers' StableDiffusionPipeline does for SD2.1-base: the OpenCLIP-H text model
(``text_encoder/``, a ``CLIPTextModel`` whose 23 layers already end at the penultimate one) on 77
tokens (``tokenizer/``), its last hidden state ``[77, 1024]``. No pooled embedding (width 0).
Widths come from the model, so tiny test models work the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from framer_dist.data.captioning import ModelFolderError, check_model_folder

PARTS = ("text_encoder", "tokenizer")


class SD21TextEncoder:
    """The CLIP text model and tokenizer of a local SD2.1 diffusers folder."""

    def __init__(self, folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 tokens: int = 77) -> None:
        from transformers import AutoTokenizer, CLIPTextModel

        root = check_model_folder(folder, "--model", need=())
        missing = [p for p in PARTS if not (root / p).is_dir()]
        if missing:
            raise ModelFolderError(f"--model: {root} is not an SD2.1 folder with its text encoder "
                                   f"(missing {', '.join(missing)})")
        check_model_folder(root / "text_encoder", "--model", need=("config.json",))
        self.tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        self.model = CLIPTextModel.from_pretrained(str(root / "text_encoder"), dtype=dtype).to(device).eval()
        self.device, self.tokens = device, tokens

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tok(prompts, padding="max_length", max_length=self.tokens, truncation=True,
                       return_tensors="pt").input_ids.to(self.device)
        hidden = self.model(ids).last_hidden_state
        return hidden, hidden.new_zeros(hidden.shape[0], 0)
