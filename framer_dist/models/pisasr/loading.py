"""Build the pisasr U-Net: a preset at random init, or SD2.1-base's ``unet/`` from a local diffusers
folder (``local_files_only``; a geometry that does not fit the preset is an error naming the key),
then the FRAMER heads and the two LoRA sets (docs/specs/framer_u.md, "Presets, loading, tests")."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from .. import ModelLoadError
from .presets import GEOMETRY_KEYS, preset_config


class PretrainedLoadError(ModelLoadError):
    """A pretrained folder is missing, of another architecture, or does not fit the preset."""


def resolve_unet_dir(path: str | Path) -> Path:
    """A ``unet/`` folder, or the pipeline root holding one."""
    p = Path(path).expanduser()
    if not p.exists():
        raise PretrainedLoadError(f"config key 'model.pretrained': folder not found: {p}")
    for cand in (p / "unet", p):
        if (cand / "config.json").is_file():
            return cand
    raise PretrainedLoadError(f"config key 'model.pretrained': {p} has no unet/config.json (expected "
                              "a diffusers SD2.1-base pipeline folder or its unet/ folder)")


def read_unet_config(folder: Path) -> dict[str, Any]:
    f = folder / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise PretrainedLoadError(f"{f} is not valid JSON: {e}") from None
    if cfg.get("_class_name") != "UNet2DConditionModel":
        raise PretrainedLoadError(f"{f} describes a {cfg.get('_class_name')!r}, not a "
                                  "UNet2DConditionModel")
    return cfg


def _normalise(cfg: dict[str, Any]) -> dict[str, Any]:
    """The geometry keys with diffusers' defaults filled in, per-block ints expanded to tuples."""
    from diffusers import UNet2DConditionModel

    defaults = {k: v.default for k, v in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}
    n = len(cfg.get("block_out_channels", defaults["block_out_channels"]))
    out = {}
    for k in GEOMETRY_KEYS:
        v = cfg.get(k, defaults.get(k))
        if k in ("attention_head_dim", "transformer_layers_per_block", "layers_per_block",
                 "cross_attention_dim") and isinstance(v, int):
            v = (v,) * n
        out[k] = tuple(v) if isinstance(v, list | tuple) else v
    return out


def check_geometry(cfg: dict[str, Any], preset: str, where: str) -> None:
    want, got = _normalise(preset_config(preset)), _normalise(cfg)
    for k in GEOMETRY_KEYS:
        if want[k] != got[k]:
            raise PretrainedLoadError(f"{where}: key {k!r} is {got[k]!r}, the {preset!r} preset "
                                      f"(model.preset) has {want[k]!r}")


def build_unet(preset: str, pretrained: str | Path = "", *, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None):
    """The diffusers ``UNet2DConditionModel``: the preset at diffusers' random init, or the weights
    of ``pretrained`` (checked against the preset first). ``device="meta"`` builds no storage."""
    from diffusers import UNet2DConditionModel

    if not pretrained:
        with torch.device(device or "cpu"):
            unet = UNet2DConditionModel(**preset_config(preset))
        # diffusers warns on any .to(dtype): only cast when it changes something
        return unet.to(dtype) if dtype is not None and dtype != unet.dtype else unet
    folder = resolve_unet_dir(pretrained)
    check_geometry(read_unet_config(folder), preset, str(folder / "config.json"))
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedLoadError(f"{folder}: cannot load the U-Net weights ({first})") from None
    return unet.to(device) if device is not None else unet


def build_model(preset: str, pretrained: str | Path = "", *, heads: bool = True, head_seed: int = 0,
                lora: bool = True, lora_rank: int = 4, lora_alpha: float = 8.0, lora_seed: int = 0,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """The training module: :class:`PiSASRUNet` with the FRAMER heads (``heads``) and the pix/sem
    LoRA sets (``lora``), the pix set active. Every random init is seeded by the arguments alone,
    so every rank builds the same model."""
    from .lora import add_lora_sets
    from .unet import PiSASRUNet

    unet = build_unet(preset, pretrained, device=device, dtype=dtype)
    with torch.device(device or "cpu"):
        model = PiSASRUNet(unet, heads=heads, head_seed=head_seed)
        if lora:
            add_lora_sets(model.unet, rank=lora_rank, alpha=lora_alpha, seed=lora_seed)
    if dtype is not None:
        model.to(dtype)
    return model


def copy_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, *,
                 ignore: tuple[str, ...] = (), exact: bool = False) -> int:
    """Copy ``state`` into ``model``'s parameters of the same names (``init_from``, framer-sr's
    LoRA file, the analysis' trainer checkpoints). A name the model lacks (unless it starts with an
    ``ignore`` prefix, e.g. heads an inference model does not have) or a shape that differs is a
    ``ModelLoadError`` naming it and ``what``; ``exact``: ``state`` must also hold every parameter
    of ``model`` that is a LoRA adapter. Returns how many tensors were copied."""
    from .lora import is_lora_key

    own = dict(model.named_parameters())
    unknown = sorted(k for k in state if k not in own and not k.startswith(ignore))
    if unknown:
        raise ModelLoadError(f"{what} holds {len(unknown)} tensors this model does not have, e.g. "
                             f"{unknown[0]!r} (another preset or LoRA rank?)")
    if exact:
        missing = sorted(k for k in own if is_lora_key(k) and k not in state)
        if missing:
            raise ModelLoadError(f"{what} lacks {len(missing)} of the model's adapter tensors, "
                                 f"e.g. {missing[0]!r}")
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise ModelLoadError(f"{what}: {k!r} has shape {tuple(v.shape)}, the model "
                                 f"{tuple(own[k].shape)} (another preset or pisasr.lora_rank?)")
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v)
    return sum(k in own for k in state)
