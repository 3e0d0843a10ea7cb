"""PiSA-SR's released checkpoint -> the pisasr family's LoRA export, so FRAMER_U can start from it
(``pisasr.init_from``) or be compared with it (``framer-sr --checkpoint ... --base SD2.1``).

The release is a ``torch.save`` dict (PiSA-SR's ``save_model``): the six adapters' target-module
lists ``unet_lora_{encoder,decoder,others}_modules_{pix,sem}``, the ranks ``lora_rank_unet_pix`` /
``lora_rank_unet_sem`` and ``state_dict_unet``, the U-Net's LoRA tensors under peft's names. Our
adapters carry the release's names (``lora.py``), so the tensors are this model's ``unet.*`` LoRA
parameters; peft's default ``lora_alpha`` 8 applies (the release sets none). It is read with
``weights_only=True`` (:mod:`framer_dist.safe_load`): a file that needs more is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from framer_dist.models import ModelLoadError

MODULE_KEYS = {(part, s): f"unet_lora_{part}_modules_{s}"
               for s in ("pix", "sem") for part in ("encoder", "decoder", "others")}
RANK_KEYS = {"pix": "lora_rank_unet_pix", "sem": "lora_rank_unet_sem"}
STATE_KEY = "state_dict_unet"
PEFT_ALPHA = 8.0   # peft's LoraConfig default; the release's configs give no lora_alpha


def read_release(path: str | Path) -> dict[str, Any]:
    """The release dict, loaded safely, with the keys PiSA-SR writes (one line naming a missing one)."""
    from framer_dist.safe_load import CheckpointLoadError, load_torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"PiSA-SR release not found: {p}")
    try:
        rel = load_torch(p)
    except CheckpointLoadError as e:
        raise ModelLoadError(str(e)) from None
    if not isinstance(rel, dict):
        raise ModelLoadError(f"{p} is not a PiSA-SR release (a dict), it holds a {type(rel).__name__}")
    missing = [k for k in (*MODULE_KEYS.values(), *RANK_KEYS.values(), STATE_KEY) if k not in rel]
    if missing:
        raise ModelLoadError(f"{p} is not a PiSA-SR release: no {missing[0]!r} "
                             f"({len(missing)} of its keys missing)")
    return rel


def release_tensors(path: str | Path, preset: str) -> tuple[dict[str, Tensor], int]:
    """The release's LoRA tensors under this family's parameter names, and its rank, checked
    against the preset: the same target modules per adapter, every tensor present, the shapes."""
    from .loading import build_model, build_unet
    from .lora import is_lora_key, release_targets

    p = Path(path).expanduser()
    rel = read_release(p)
    ranks = {s: rel[k] for s, k in RANK_KEYS.items()}
    if ranks["pix"] != ranks["sem"] or not isinstance(ranks["pix"], int):
        raise ModelLoadError(f"{p}: ranks pix {ranks['pix']!r} and sem {ranks['sem']!r}; the pisasr "
                             "family gives both sets one rank (pisasr.lora_rank)")
    rank = ranks["pix"]
    targets = release_targets(build_unet(preset, device="meta"))
    for (part, s), key in MODULE_KEYS.items():
        theirs, ours = list(rel[key]), targets[part]
        if set(theirs) != set(ours):
            odd = sorted(set(theirs) ^ set(ours))
            raise ModelLoadError(f"{p}: {key} does not fit model.preset={preset!r}: "
                                 f"{len(odd)} modules differ, e.g. {odd[0]!r}")
    model = build_model(preset, heads=False, lora_rank=rank, lora_alpha=PEFT_ALPHA, device="meta")
    want = {n: tuple(t.shape) for n, t in model.named_parameters() if is_lora_key(n)}
    state = rel[STATE_KEY]
    got = {f"unet.{k}": v for k, v in state.items()} if isinstance(state, dict) else {}
    if set(got) != set(want):
        odd = sorted(set(got) ^ set(want))
        raise ModelLoadError(f"{p}: {STATE_KEY} does not hold exactly the adapters' tensors: "
                             f"{len(odd)} names differ, e.g. {odd[0]!r}")
    for k, v in got.items():
        if not isinstance(v, Tensor) or tuple(v.shape) != want[k]:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ModelLoadError(f"{p}: {k[len('unet.'):]!r} is {shape}, the model's {want[k]}")
    return {k: v.detach().float().contiguous() for k, v in got.items()}, rank


def import_release(path: str | Path, preset: str, out_dir: str | Path) -> Path:
    """Write ``<out_dir>/pisasr_lora.safetensors`` (the trainer's LoRA export format) and the
    family record from a PiSA-SR release. Returns the file."""
    from framer_dist.atomic import save_safetensors_atomic, write_text_atomic
    from framer_dist.export import FAMILY_FILE

    from .family import LORA_FILE

    tensors, rank = release_tensors(path, preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "family": "pisasr", "preset": preset, "lora_rank": str(rank),
            "lora_alpha": str(PEFT_ALPHA), "source": f"PiSA-SR release {Path(path).name}"}
    f = save_safetensors_atomic(tensors, out / LORA_FILE, metadata=meta)
    write_text_atomic(out / FAMILY_FILE, json.dumps({"family": "pisasr"}) + "\n")
    return f
