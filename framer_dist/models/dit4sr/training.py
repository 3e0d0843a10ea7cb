"""Training modes (docs/specs/dit4sr.md, ``train.mode``) and adapter export/reload.

- ``control``: only the DiT4SR layers (``*_control`` projections, the injection conv) train.
- ``lora``: ``control`` plus peft LoRA adapters on the frozen attention projections
  (``dit4sr.lora.targets``; the feed-forward linears too with ``dit4sr.lora.include_mlp``).
- ``full``: every transformer parameter trains.

LoRA adapters are exported in the diffusers pipeline layout (keys ``transformer.<module>.lora_A
.weight``, the peft config as safetensors metadata), so ``load_lora_adapter(..., prefix=
"transformer")`` reloads them; the control layers are exported separately.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ...atomic import save_safetensors_atomic
from .config import LoraConfig as LoraSettings
from .loading import is_control_key
from .transformer import DiT4SRTransformer

MODES = ("control", "lora", "full")
ADAPTER = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"
CONTROL_FILE = "dit4sr_control.safetensors"
PREFIX = "transformer"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
MLP_TARGETS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None)) and ADAPTER in model.peft_config


def lora_target_modules(lora_cfg: LoraSettings) -> list[str]:
    targets = list(lora_cfg.targets)
    if lora_cfg.include_mlp:
        targets += [t for t in MLP_TARGETS if t not in targets]
    return targets


def add_lora(model: DiT4SRTransformer, lora_cfg: LoraSettings) -> None:
    """Inject peft LoRA adapters (named ``default``) into the frozen projections."""
    from peft import LoraConfig

    targets = lora_target_modules(lora_cfg)
    if not targets:
        raise ValueError("config key 'dit4sr.lora.targets': empty; name at least one projection")
    config = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets, init_lora_weights=True)
    try:
        model.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        if "not found in the base model" in str(e):
            raise ValueError(f"config key 'dit4sr.lora.targets': {targets} match no module of the "
                             "transformer (valid names end like 'to_q', 'to_out.0', 'add_q_proj', "
                             "'ff.net.2')") from None
        raise


def apply_training_mode(model: DiT4SRTransformer, mode: str,
                        lora_cfg: LoraSettings | None = None) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``mode`` (adding LoRA for ``lora``); return the trainable list."""
    if mode not in MODES:
        raise ValueError(f"config key 'train.mode': {mode!r} is not allowed; allowed values: "
                         + ", ".join(map(repr, MODES)))
    if mode == "lora" and not has_lora(model):
        add_lora(model, lora_cfg if lora_cfg is not None else LoraSettings())

    def trains(name: str) -> bool:
        if mode == "full":
            return True
        return is_control_key(name) or (mode == "lora" and is_lora_key(name))

    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name))
        if p.requires_grad:
            params.append(p)
    return params


# ---------------------------------------------------------------------- export / reload


def lora_state_dict(model: DiT4SRTransformer) -> dict[str, torch.Tensor]:
    """The adapter tensors, keys without the adapter name (peft's own layout)."""
    from peft.utils import get_peft_model_state_dict

    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter (train.mode must be 'lora')")
    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def save_lora(model: DiT4SRTransformer, out_dir: str | Path,
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors``. Under ZeRO-3/FSDP2 pass a gathered
    ``state_dict``: peft's layout (:func:`lora_state_dict`) or plain parameter names such as a
    backend's ``full_trainable_state_dict()`` (non-LoRA entries are ignored); never call this on
    sharded parameters directly."""
    if not has_lora(model):
        raise ValueError("save_lora: the model has no LoRA adapter (train.mode must be 'lora')")
    if state_dict is None:
        sd = lora_state_dict(model)
    else:  # parameter names carry the adapter name: "...to_q.lora_A.default.weight"
        sd = {k.replace(f".{ADAPTER}.", "."): v for k, v in state_dict.items() if is_lora_key(k)}
        if not sd:
            raise ValueError("save_lora: the given state_dict holds no LoRA tensors")
    cfg = model.peft_config[ADAPTER].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    meta = {"format": "pt",
            _METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in cfg.items()},
                                      sort_keys=True, default=str)}
    tensors = {f"{PREFIX}.{k}": v for k, v in sd.items()}
    return save_safetensors_atomic(tensors, Path(out_dir) / LORA_FILE, metadata=meta)


def load_lora(model: DiT4SRTransformer, path: str | Path) -> None:
    """Load an adapter written by :func:`save_lora` through diffusers' ``load_lora_adapter``."""
    p = Path(path)
    folder, name = (p.parent, p.name) if p.is_file() else (p, LORA_FILE)
    if not (folder / name).is_file():
        raise FileNotFoundError(f"LoRA adapter file not found: {folder / name}")
    expected = {k.removeprefix(f"{PREFIX}.") for k in load_file(folder / name)}
    model.load_lora_adapter(str(folder), weight_name=name, prefix=PREFIX, adapter_name=ADAPTER)
    loaded = set(lora_state_dict(model))
    if loaded != expected:
        raise ValueError(f"{folder / name}: adapter tensors did not all load "
                         f"(missing in model: {sorted(expected - loaded)[:10]})")


def control_state_dict(model: DiT4SRTransformer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_control_key(k)}


def save_control(model: DiT4SRTransformer, path: str | Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The DiT4SR layers alone (what ``control`` mode trains), as one safetensors file; a given
    ``state_dict`` (e.g. gathered from a sharded backend) is filtered to the control tensors."""
    sd = control_state_dict(model) if state_dict is None else {
        k: v for k, v in state_dict.items() if is_control_key(k)}
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / CONTROL_FILE
    return save_safetensors_atomic(sd, p)


def load_control(model: DiT4SRTransformer, path: str | Path) -> None:
    p = Path(path)
    if p.is_dir():
        p = p / CONTROL_FILE
    if not p.is_file():
        raise FileNotFoundError(f"control weights not found: {p}")
    sd = load_file(p)
    want = set(control_state_dict(model))
    if set(sd) != want:
        raise ValueError(f"{p}: control tensors do not match the model: missing "
                         f"{sorted(want - set(sd))[:10]}, unexpected {sorted(set(sd) - want)[:10]}")
    model.load_state_dict(sd, strict=False)
