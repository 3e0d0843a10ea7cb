"""Build the backbone, load pretrained SD3/SD3.5 weights from a local diffusers folder, save it.

Accepted folders: a transformer folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
or a sharded ``...safetensors.index.json``), or a pipeline root holding ``transformer/``. A stock
SD3 folder gets the DiT4SR layers added at their initial values *after* loading (so
``to_out_control`` copies the loaded ``to_out[0]``); a folder written by :func:`save_model`
(our own ``save_pretrained``) has them and loads them. A folder saved from the DiT4SR authors'
model (their released checkpoints) loads too: :func:`from_authors_layout` maps its names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ...atomic import write_dir_atomic
from ...config import ModelConfig
from .. import ModelLoadError
from .presets import GEOMETRY_KEYS, preset_geometry
from .transformer import DiT4SRTransformer

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
ACCEPTED_CLASSES = ("SD3Transformer2DModel", "DiT4SRTransformer")
CONTROL_MARK = "_control."


class PretrainedLoadError(ModelLoadError):
    """A pretrained folder is missing, of another architecture, or has the wrong tensors."""


def is_control_key(name: str) -> bool:
    return CONTROL_MARK in name


def resolve_transformer_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise PretrainedLoadError(f"config key 'model.pretrained': folder not found: {p}")
    for cand in (p, p / "transformer"):
        if (cand / "config.json").is_file():
            return cand
    raise PretrainedLoadError(f"config key 'model.pretrained': {p} has no config.json, neither "
                              "directly nor in transformer/ (expected a diffusers SD3 transformer "
                              "folder or a pipeline root)")


def read_transformer_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise PretrainedLoadError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
    cls = cfg.get("_class_name")
    if cls not in ACCEPTED_CLASSES:
        raise PretrainedLoadError(
            f"{folder / 'config.json'} describes a {cls!r}, not an SD3/SD3.5 transformer "
            f"(expected _class_name in {ACCEPTED_CLASSES})")
    return cfg


def _geometry_from(cfg: dict[str, Any]) -> dict[str, Any]:
    base = DiT4SRTransformer.extract_init_dict(dict(cfg))[0]
    base.pop("lr_injection_scale", None)
    base["dual_attention_layers"] = tuple(base.get("dual_attention_layers") or ())
    return base


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors (one file or the shards of an index)."""
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text()).get("weight_map", {})
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            f = folder / shard
            if not f.is_file():
                raise PretrainedLoadError(f"{folder / INDEX} names shard {shard}, which is missing")
            sd.update(load_file(f))
        return sd
    if (folder / WEIGHTS).is_file():
        return load_file(folder / WEIGHTS)
    found = sorted(x.name for x in folder.iterdir() if x.is_file())
    raise PretrainedLoadError(f"{folder}: no {WEIGHTS} or {INDEX} (found: {', '.join(found)}); "
                              "only safetensors are read")


# The DiT4SR authors' release (their SD3Transformer2DModel copy, saved with save_pretrained), as
# measured against their code: the LR branch's conv lives in the feed-forward module, and the
# dual-attention blocks' second attention carries context projections whose outputs are never used.
_AUTHORS_CONV = re.compile(r"^(transformer_blocks\.\d+)\.ff\.control_conv\.(weight|bias)$")
_AUTHORS_UNUSED = re.compile(
    r"^transformer_blocks\.\d+\.attn2\.(add_[qkv]_proj|to_add_out|norm_added_[qk])\.(weight|bias)$")


def from_authors_layout(sd: dict[str, torch.Tensor], expected: set[str]
                        ) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """Our names for a state dict in the DiT4SR authors' layout (recognised by their
    ``ff.control_conv`` tensors; anything else is returned as it is): ``transformer_blocks.{i}
    .ff.control_conv.*`` -> ``transformer_blocks.{i}.conv_control.*``, and their unused
    ``attn2.add_{q,k,v}_proj``, ``attn2.to_add_out`` and ``attn2.norm_added_{q,k}`` tensors dropped.
    Returns (state dict, renamed count, dropped names)."""
    if not any(_AUTHORS_CONV.match(k) for k in sd):
        return sd, 0, []
    out: dict[str, torch.Tensor] = {}
    renamed, dropped = 0, []
    for k, v in sd.items():
        if m := _AUTHORS_CONV.match(k):
            out[f"{m.group(1)}.conv_control.{m.group(2)}"] = v
            renamed += 1
        elif _AUTHORS_UNUSED.match(k) and k not in expected:
            dropped.append(k)
        else:
            out[k] = v
    return out, renamed, dropped


def _list(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_pretrained(path: str | Path, *, preset: str | None = None,
                    lr_injection_scale: float | None = None, device: Any = None,
                    dtype: torch.dtype | None = None) -> DiT4SRTransformer:
    """Load a stock SD3/SD3.5 or a saved DiT4SR transformer folder.

    The model is built on the meta device and the file tensors are assigned, so the stock weights
    are never allocated twice. ``preset`` (if given) must describe the same geometry.
    """
    folder = resolve_transformer_dir(path)
    file_cfg = read_transformer_config(folder)
    geometry = _geometry_from(file_cfg)
    if preset is not None:
        want = preset_geometry(preset)
        diff = [f"{k}: folder {geometry.get(k)!r} vs preset {want.get(k)!r}" for k in GEOMETRY_KEYS
                if _norm(geometry.get(k)) != _norm(want.get(k))]
        if diff:
            raise PretrainedLoadError(f"config key 'model.pretrained': {folder} does not have the "
                                      f"geometry of model.preset={preset!r}: " + "; ".join(diff))
    scale = lr_injection_scale if lr_injection_scale is not None else file_cfg.get(
        "lr_injection_scale", 1.2)
    sd = read_state_dict(folder)

    with torch.device("meta"):
        model = DiT4SRTransformer(**geometry, lr_injection_scale=scale)
    expected = set(model.state_dict().keys())
    sd, renamed, dropped = from_authors_layout(sd, expected)
    if renamed and os.environ.get("RANK", "0") == "0":
        from framer_dist.log import get_logger
        get_logger().info(
            f"{folder}: the DiT4SR authors' layout: {renamed} ff.control_conv tensors read as "
            f"conv_control; {len(dropped)} unused attn2 tensors dropped (add_q/k/v_proj, "
            "to_add_out, norm_added_q/k: their outputs are never used)")
    stock = {k for k in expected if not is_control_key(k)}
    control = expected - stock
    got = set(sd)
    missing = sorted(stock - got)
    unexpected = sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors: {_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors: {_list(unexpected)}")
        raise PretrainedLoadError(f"{folder}: weights do not match the architecture of its "
                                  f"config.json; " + "; ".join(parts))
    has_control = sorted(control & got)
    if has_control and len(has_control) != len(control):
        raise PretrainedLoadError(f"{folder}: only some DiT4SR control tensors are present; "
                                  f"missing: {_list(sorted(control - got))}")
    shape_errors = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in model.state_dict().items() if k in sd and sd[k].shape != v.shape]
    if shape_errors:
        raise PretrainedLoadError(f"{folder}: tensor shapes differ from config.json: "
                                  f"{_list(shape_errors)}")

    model.load_state_dict(sd, strict=False, assign=True)
    if not has_control:
        # Materialise the new layers next to the loaded weights, then the DiT4SR init
        # (to_out_control := the loaded to_out[0]).
        ref = model.proj_out.weight
        for blk in model.transformer_blocks:
            for mod in (blk.attn, blk.attn2):
                if mod is None:
                    continue
                for name in ("to_q_control", "to_k_control", "to_v_control", "to_out_control"):
                    getattr(mod, name).to_empty(device=ref.device).to(ref.dtype)
            blk.conv_control.to_empty(device=ref.device).to(ref.dtype)
        model.init_control_layers()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta]
    if leftover:  # a non-persistent buffer would end up here; never silently keep meta tensors
        raise PretrainedLoadError(f"{folder}: tensors left uninitialised: {_list(leftover)}")
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def build_model(cfg: ModelConfig, *, lr_injection_scale: float = 1.2, device: Any = None,
                dtype: torch.dtype | None = None) -> DiT4SRTransformer:
    """The backbone of ``cfg.preset``; with ``cfg.pretrained`` the weights come from that folder.
    ``lr_injection_scale``: the run's ``dit4sr.lr_injection_scale`` (it overrides a folder's).

    Parameters are fp32 unless ``dtype`` says otherwise (master weights; a bf16 release file is
    upcast), so random and pretrained models start alike.
    """
    if cfg.pretrained:
        return load_pretrained(cfg.pretrained, preset=cfg.preset,
                               lr_injection_scale=lr_injection_scale, device=device,
                               dtype=dtype or torch.float32)
    geometry = preset_geometry(cfg.preset)
    with torch.device(device if device is not None else "cpu"):
        model = DiT4SRTransformer(**geometry, lr_injection_scale=lr_injection_scale)
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def save_model(model: DiT4SRTransformer, out_dir: str | Path,
               max_shard_size: str | int = "10GB") -> Path:
    """The whole model (stock + control tensors) in the diffusers layout, readable by
    :func:`load_pretrained`. Merge or export LoRA adapters first (see ``training.py``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("save_model: the model has LoRA adapters; export them with save_lora() "
                         "or merge them first (model.fuse_lora(); model.unload_lora())")
    # Written under a temporary name and renamed: the folder is complete or absent.
    return write_dir_atomic(out_dir, lambda tmp: model.save_pretrained(
        tmp, safe_serialization=True, max_shard_size=max_shard_size))
