"""PiSA-SR's two LoRA sets and its two stages (docs/specs/framer_u.md, "Backbone").

Two sets, ``pix`` and ``sem``, of three peft adapters each, named as in PiSA-SR's release
(``default_{encoder,decoder,others}_{pix,sem}``, so a release checkpoint's ``state_dict_unet``
keys are this model's ``unet.*`` adapter keys). The release selects every parameter whose name
holds none of ``bias`` / ``norm`` and one of ``to_k to_q to_v to_out.0 conv conv1 conv2 conv_in
conv_shortcut conv_out proj_out proj_in ff.net.2 ff.net.0.proj``, and splits them by name into
encoder (``down_blocks`` + ``conv_in``), decoder (``up_blocks`` + ``conv_out``) and others (the
mid block). The regular expressions below select exactly those modules (a test checks them
against the release's rule): on SD2.1-base 4,055,712 LoRA parameters per set at rank 4.
peft's defaults of the release: gaussian init (A ~ N(0, 1/r), B = 0), ``lora_alpha`` 8, no
dropout.

Stages (two launches, ``train.mode``): ``pix`` activates and trains the pix set alone; ``sem``
activates both sets and trains sem alone. The FRAMER heads train in either stage when asked.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

SETS = ("pix", "sem")
PARTS = ("encoder", "decoder", "others")
STAGES = ("pix", "sem")
STAGE_ACTIVE = {"pix": ("pix",), "sem": ("pix", "sem")}   # adapter sets in the forward
STAGE_TRAINS = {"pix": "pix", "sem": "sem"}               # the set that trains

# The release's leaf modules inside a block (resnet convs, resamplers, transformer projections).
_LEAF = (r"(resnets\.\d+\.(conv1|conv2|conv_shortcut)"
         r"|(downsamplers|upsamplers)\.\d+\.conv"
         r"|attentions\.\d+\.(proj_in|proj_out"
         r"|transformer_blocks\.\d+\.(attn\d+\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))))")
TARGETS = {
    "encoder": rf"(conv_in|down_blocks\.\d+\.{_LEAF})",
    "decoder": rf"(conv_out|up_blocks\.\d+\.{_LEAF})",
    "others": rf"mid_block\.{_LEAF}",
}

# The release's selection rule, kept for the test that pins TARGETS to it.
RELEASE_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
                    "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")


def adapter_name(part: str, lora_set: str) -> str:
    return f"default_{part}_{lora_set}"


def adapter_names(sets: Iterable[str]) -> list[str]:
    sets = list(sets)
    bad = [s for s in sets if s not in SETS]
    if bad:
        raise ValueError(f"unknown LoRA set(s) {bad}; the sets are {SETS}")
    return [adapter_name(p, s) for s in sets for p in PARTS]


def release_targets(unet: nn.Module) -> dict[str, list[str]]:
    """The module names PiSA-SR's ``initialize_unet`` selects, per part (its rule, re-stated)."""
    out: dict[str, list[str]] = {p: [] for p in PARTS}
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in RELEASE_PATTERNS:
            if pattern in n:
                name = n.replace(".weight", "")
                if "down_blocks" in n or "conv_in" in n:
                    out["encoder"].append(name)
                elif "up_blocks" in n or "conv_out" in n:
                    out["decoder"].append(name)
                else:
                    out["others"].append(name)
                break
    return out


def _set_of(param_name: str) -> str | None:
    m = re.search(r"\.lora_[AB]\.default_(?:encoder|decoder|others)_(pix|sem)\.", param_name)
    return m.group(1) if m else None


def is_lora_key(name: str) -> bool:
    return _set_of(name) is not None


def lora_set(name: str) -> str | None:
    """The set ('pix' / 'sem') a parameter name's adapter belongs to, or None."""
    return _set_of(name)


def is_head_key(name: str) -> bool:
    return name.startswith("framer_heads.") or ".framer_heads." in name


def lora_parameters(model: nn.Module, lora_set: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of one set's adapters, in module order."""
    return [(n, p) for n, p in model.named_parameters() if _set_of(n) == lora_set]


def has_lora(unet: nn.Module) -> bool:
    cfg = getattr(unet, "peft_config", None) or {}
    return all(a in cfg for a in adapter_names(SETS))


def add_lora_sets(unet: nn.Module, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> None:
    """Add the six adapters to a diffusers ``UNet2DConditionModel`` (``model.unet``), seeded by
    ``seed`` alone (the same on every rank), and activate the pix set (stage 1's forward)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"config key 'pisasr.lora_rank': must be >= 1, got {rank}")
    if getattr(unet, "peft_config", None):
        raise ValueError("add_lora_sets: the U-Net already has adapters "
                         f"{sorted(unet.peft_config)}")
    devices = sorted({p.device.index or 0 for p in unet.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # peft warns on every adapter after the first; six adapters are the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        torch.manual_seed(int(seed))
        for lora_set in SETS:
            for part in PARTS:
                conf = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=0.0,
                                  init_lora_weights="gaussian", target_modules=TARGETS[part])
                unet.add_adapter(conf, adapter_name=adapter_name(part, lora_set))
    set_active_sets(unet, ("pix",))


def set_active_sets(unet: nn.Module, sets: Sequence[str]) -> None:
    """Make exactly the adapters of ``sets`` take part in the forward, leaving every parameter's
    ``requires_grad`` as it was (peft's ``set_adapter`` would change it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = adapter_names(sets)
    flags = {p: p.requires_grad for p in unet.parameters()}
    for m in unet.modules():
        if isinstance(m, BaseTunerLayer):
            m.set_adapter(names)
    for p, f in flags.items():
        p.requires_grad_(f)


def active_sets(unet: nn.Module) -> tuple[str, ...]:
    """The LoRA sets that are active (in the forward)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in unet.modules():
        if isinstance(m, BaseTunerLayer):
            act = set(m.active_adapters)
            return tuple(s for s in SETS if any(a.endswith(f"_{s}") for a in act))
    return ()


@contextlib.contextmanager
def using_sets(unet: nn.Module, sets: Sequence[str]) -> Iterator[None]:
    """Temporarily activate ``sets`` (restored afterwards)."""
    before = active_sets(unet)
    set_active_sets(unet, sets)
    try:
        yield
    finally:
        set_active_sets(unet, before)


def apply_stage(model: nn.Module, stage: str, *, train_heads: bool = True) -> list[nn.Parameter]:
    """Set up ``model`` (a :class:`PiSASRUNet` with both sets) for ``stage``: activate the stage's
    sets and make exactly the stage's LoRA set (plus the FRAMER heads with ``train_heads``)
    trainable. Returns the trainable parameters in module order."""
    if stage not in STAGES:
        raise ValueError(f"config key 'train.mode': {stage!r} is not allowed; allowed values: "
                         + ", ".join(map(repr, STAGES)))
    unet = model.unet
    if not has_lora(unet):
        raise ValueError("apply_stage: the U-Net has no pix/sem LoRA sets (add_lora_sets first)")
    set_active_sets(unet, STAGE_ACTIVE[stage])
    trains = STAGE_TRAINS[stage]
    params = []
    for name, p in model.named_parameters():
        on = _set_of(name) == trains or (train_heads and is_head_key(name))
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params


@torch.no_grad()
def merge_sets(model: nn.Module, sets: Sequence[str] = SETS) -> nn.Module:
    """Fold the adapters of ``sets`` into the base weights and remove every adapter, in place
    (PiSA-SR's inference merges both sets; ``("pix",)`` gives its adjustable mode's pix-only
    U-Net). Returns ``model.unet``, now a stock ``UNet2DConditionModel`` (stock keys and count)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = model.unet
    names = adapter_names(sets)
    for m in unet.modules():
        if isinstance(m, BaseTunerLayer):
            present = [a for a in names if a in m.lora_A]
            if present:
                m.merge(adapter_names=present)
    unet.unload_lora()
    return unet


@torch.no_grad()
def adjustable_residual(model: nn.Module, z_l: Tensor, encoder_hidden_states: Tensor,
                        lambda_pix: float = 1.0, lambda_sem: float = 1.0) -> Tensor:
    """PiSA-SR's adjustable inference: ``l_pix * r_pix + l_sem * (r_both - r_pix)`` with ``r_pix``
    the U-Net output with the pix set alone and ``r_both`` with both sets (``z_H = z_L - that``).
    ``(1, 1)`` is the default output ``r_both``."""
    unet = model.unet
    with using_sets(unet, ("pix",)):
        r_pix = model(z_l, encoder_hidden_states).sample.float()
    with using_sets(unet, ("pix", "sem")):
        r_both = model(z_l, encoder_hidden_states).sample.float()
    return lambda_pix * r_pix + lambda_sem * (r_both - r_pix)
