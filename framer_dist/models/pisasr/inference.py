"""The pisasr family's inference (``InferenceSpec``): framer-sr runs a FRAMER_U export in one step,
with PiSA-SR's adjustable mode, the latent tiling and the colour fix of framer-sr.

Kinds (``--kind auto`` recognises them by their files; a folder holding both, as the trainer's
``export/``, resolves to ``full``):

- ``full``: a stock diffusers ``UNet2DConditionModel`` folder (the trainer's ``export/unet``: both
  LoRA sets merged), or a pipeline root with ``unet/``. One residual: no adjustable mode.
- ``lora``: ``pisasr_lora.safetensors`` (both sets) on top of ``--base``, the SD2.1-base folder it
  was trained from; ``--lambda-pix`` / ``--lambda-sem`` weigh the two sets
  (``l_pix r_pix + l_sem (r_both - r_pix)``, ``lora.adjustable_residual``).
- ``trainer``: a trainer checkpoint (a ``step_*`` folder, or the checkpoint root): the training
  module rebuilt from the run's own config (``model.pretrained``, or ``--base``, and
  ``pisasr.init_from``) with the checkpoint's trained tensors, FRAMER heads included, the stage's
  sets active. The layer-hierarchy analysis needs it (exports hold no heads).

Exports are loaded without the FRAMER heads (``heads=False``); the readout refuses such a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from framer_dist.models import InferenceSpec, ModelLoadError, ModelShape, Prompt

KINDS = ("full", "lora", "trainer")
LAMBDAS = (
    (("--lambda-pix",), dict(type=float, default=1.0, dest="lambda_pix",
                             help="pisasr LoRA exports: weight of the pixel set's residual "
                                  "(PiSA-SR's adjustable mode)")),
    (("--lambda-sem",), dict(type=float, default=1.0, dest="lambda_sem",
                             help="pisasr LoRA exports: weight of the semantic set's residual "
                                  "(0 = the pixel set alone)")),
)


def _unet_folder(p: Path) -> Path | None:
    return next((d for d in (p, p / "unet") if (d / "config.json").is_file()), None)


def detect_kind(path: str | Path, skip: tuple[str, ...] = ()) -> tuple[str, Path]:
    """(kind, the file or folder to load) for an existing checkpoint file or folder."""
    from framer_dist.checkpoint import is_checkpoint_path

    from .family import LORA_FILE

    p = Path(path).expanduser()
    if is_checkpoint_path(p):
        return "trainer", p
    if p.is_file():
        if p.suffix == ".safetensors":
            return "lora", p
        raise ModelLoadError(f"checkpoint {p} is a file but not .safetensors")
    candidates = [p] + sorted(d for d in p.iterdir() if d.is_dir() and d.name not in skip)
    for c in candidates:
        if (full := _unet_folder(c)) is not None:
            return "full", full
    for c in candidates:
        if (c / LORA_FILE).is_file():
            return "lora", c / LORA_FILE
    raise ModelLoadError(f"{p} holds no pisasr checkpoint: looked for a trainer checkpoint "
                         f"(COMPLETE, or a checkpoint root), config.json (a U-Net folder, or "
                         f"unet/) or {LORA_FILE} in it and its sub-folders")


def _lora_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise ModelLoadError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("family") != "pisasr" or "preset" not in meta:
        raise ModelLoadError(f"{path} is not a pisasr LoRA export (its metadata names no pisasr "
                             "preset; written by the trainer's checkpoint.export = ['lora'])")
    return meta


def load_checkpoint(kind: str, path: Path, base: Path | None) -> nn.Module:
    """A :class:`PiSASRUNet` without heads: the merged U-Net (``full``), or ``base`` with both
    LoRA sets of the export at ``path`` (``lora``), both sets active."""
    from .loading import PretrainedLoadError, build_model
    from .lora import set_active_sets
    from .unet import PiSASRUNet

    if kind == "trainer":
        return _load_trainer_checkpoint(path, base)
    try:
        if kind == "full":
            from diffusers import UNet2DConditionModel

            from .loading import read_unet_config
            read_unet_config(path)  # a U-Net folder, or one line naming what it is
            unet = UNet2DConditionModel.from_pretrained(str(path), local_files_only=True)
            return PiSASRUNet(unet, heads=False)
        if not base:
            raise ModelLoadError(f"{path} is a pisasr LoRA export: it needs --base, the SD2.1-base "
                                 "folder (or its unet/) it was trained on")
        if not Path(base).exists():
            raise ModelLoadError(f"--base folder not found: {base}")
        meta = _lora_meta(path)
        model = build_model(meta["preset"], base, heads=False, lora_rank=int(meta["lora_rank"]),
                            lora_alpha=float(meta["lora_alpha"]))
        _load_lora(model, path)
        set_active_sets(model.unet, ("pix", "sem"))
        return model
    except PretrainedLoadError as e:
        raise ModelLoadError(str(e).replace("config key 'model.pretrained'", "--base")) from None
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {kind} checkpoint {path}: {first}") from None


def _load_trainer_checkpoint(path: Path, base: Path | None) -> nn.Module:
    """The training module as the run built it (its config: preset, LoRA rank, the pretrained
    U-Net or ``base``, ``pisasr.init_from``, the init seed), then the checkpoint's trained tensors."""
    from framer_dist.checkpoint import find_checkpoint, run_config
    from framer_dist.config import ConfigError, config_from_dict
    from framer_dist.parallel import read_checkpoint_weights
    from framer_dist.safe_load import CheckpointLoadError

    from .family import build
    from .loading import copy_weights
    from .lora import STAGE_ACTIVE, set_active_sets

    try:
        step = find_checkpoint(path, str(path))
        cfg = config_from_dict(run_config(step))
        if base:
            cfg.model.pretrained = str(base)
        torch.manual_seed(cfg.train.seed)  # what the checkpoint does not hold starts as it did
        model = build(cfg)
        state = read_checkpoint_weights(step)
    except (FileNotFoundError, KeyError, TypeError, ConfigError, CheckpointLoadError) as e:
        why = str(e).replace("config key 'checkpoint.resume': ", "")
        raise ModelLoadError(f"cannot load trainer checkpoint {path}: {why}") from None
    copy_weights(model, state, f"trainer checkpoint {path}")
    set_active_sets(model.unet, STAGE_ACTIVE[cfg.train.mode])
    return model


def readout(model: nn.Module, x0: Tensor, lr_latent: Tensor, sigma: float, noise: Tensor,
            cond: Prompt, feature: str) -> tuple[Tensor, Tensor | None]:
    """Every block's FRAMER feature as in training (``feature``: x0 / velocity / hidden), the last
    being the teacher (the real output). A one-step model sees only the LR latent: ``x0``,
    ``sigma`` and ``noise`` play no part."""
    if model.framer_heads is None:
        raise ModelLoadError("the pisasr layer readout needs the FRAMER heads, which exports do not "
                             "hold: analyse a trainer checkpoint of a run with FRAMER on (a step_* "
                             "folder or the checkpoint root; --kind trainer)")
    e = cond[0]
    e = e if e.shape[0] == lr_latent.shape[0] else e.expand(lr_latent.shape[0], *e.shape[1:])
    out = model(lr_latent, e.to(lr_latent.device), readout=feature)
    return out.features.float(), None


def _load_lora(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    from .loading import copy_weights

    copy_weights(model, load_file(str(path)), str(path), exact=True)


def shape(model: nn.Module) -> ModelShape:
    """4 latent channels; sides padded to the U-Net's total downsampling; no pooled prompt."""
    c = model.unet.config
    return ModelShape(int(c.in_channels), 2 ** int(model.unet.num_upsamplers),
                      (int(c.cross_attention_dim), 0))


def sample(model: nn.Module, lr_latent: Tensor, cond: Prompt, uncond: Prompt | None, opts: Any, *,
           seed: int, dtype: torch.dtype | None = None,
           progress: Callable[[int], None] | None = None) -> Tensor:
    """PiSA-SR's one step on the LR latent, ``z_H = z_L - r`` (``r`` weighted by --lambda-pix /
    --lambda-sem for a LoRA export), in latent tiles. No noise, no CFG: ``seed`` is unused."""
    from framer_dist.infer.tiling import tiled_denoiser

    from .lora import active_sets, adjustable_residual

    if model.framer_heads is not None:  # the heads never reach inference (spec)
        raise ModelLoadError("framer-sr runs pisasr exports; a trainer checkpoint (kind trainer, "
                             "with the FRAMER heads) is for the layer analysis: point --checkpoint "
                             "at the run's export/ (checkpoint.export = ['lora', 'diffusers'])")
    if opts.steps != 1 or opts.guidance != 1.0:
        raise ModelLoadError(f"pisasr models are one-step models without CFG: --steps must be 1 "
                             f"and --guidance 1, got {opts.steps} and {opts.guidance}")
    fo = opts.family_options
    l_pix, l_sem = float(fo.get("lambda_pix", 1.0)), float(fo.get("lambda_sem", 1.0))
    adjustable = (l_pix, l_sem) != (1.0, 1.0)
    if adjustable and set(active_sets(model.unet)) != {"pix", "sem"}:
        raise ModelLoadError("--lambda-pix/--lambda-sem need the LoRA export (pisasr_lora.safetensors "
                             "with --base): a merged U-Net has one residual")
    embeds = cond[0]
    dt = dtype or next(model.parameters()).dtype

    def one_step(z: Tensor, lr: Tensor, sigma: Tensor) -> Tensor:
        b = lr.shape[0]
        e = embeds if embeds.shape[0] == b else embeds.repeat(b // embeds.shape[0], 1, 1)
        e = e.to(lr.device, dt)
        if adjustable:
            r = adjustable_residual(model, lr.to(dt), e, l_pix, l_sem)
        else:
            r = model(lr.to(dt), e).sample.float()
        return lr.float() - r

    fn = tiled_denoiser(one_step, opts.tile, opts.overlap, rel_std=opts.tile_std,
                        tile_batch=opts.tile_batch, multiple=shape(model).multiple)
    out = fn(lr_latent, lr_latent, torch.ones((), device=lr_latent.device))
    if progress is not None:
        progress(0)
    return out


INFERENCE = InferenceSpec(kinds=KINDS, detect=detect_kind, load=load_checkpoint, shape=shape,
                          sample=sample, readout=readout,
                          # PiSA-SR: one step, no CFG, the prompt as given (its tags or empty);
                          # no DiT4SR quality suffix, which training never saw
                          defaults={"steps": 1, "guidance": 1.0, "positive_suffix": ""},
                          arguments=LAMBDAS)
