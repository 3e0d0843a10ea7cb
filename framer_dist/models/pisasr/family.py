"""PiSA-SR as a model family (``model.family = "pisasr"``): FRAMER_U, what the trainer gets from it
through :class:`framer_dist.models.ModelFamily` (docs/specs/framer_u.md).

- modes: PiSA-SR's stages, ``pix`` (stage 1: pixel MSE, the pix LoRA set trains) and ``sem``
  (stage 2: MSE + LPIPS + CSD, the sem set trains on top of a frozen pix set), two launches;
- the step takes pixel batches (``takes_pixels``): it degrades the HR crops, encodes the LR image
  with its own frozen VAE (the posterior sample keyed by the sample's position), runs the
  one-step U-Net with the FRAMER readout, decodes and computes the stage's loss;
- the frozen helpers (VAE, LPIPS, the CSD U-Net, CSD's negative prompt) are built per rank by
  :func:`helpers`, outside the engine;
- the FRAMER heads live in the trained module (checkpoints keep them); exports never hold them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from framer_dist.config import Config, ConfigError
from framer_dist.log import get_logger
from framer_dist.models import (ModelFamily, ModelLoadError, StepContext, StepOutput,
                                register_family)

from .config import PiSASRConfig, framer_on, section
from .inference import INFERENCE
from .loading import copy_weights
from .latents import CODEC
from .presets import PRESETS, TEXT_DIMS

log = get_logger()

MODES = ("pix", "sem")   # PiSA-SR's stages (lora.STAGES)
EXPORTS = ("lora", "diffusers")
LORA_FILE = "pisasr_lora.safetensors"
UNET_DIR = "unet"
NEGATIVE_SEED = 0x4E47   # random prompts (no cache): CSD's negative prompt, the same everywhere


def build(cfg: Config) -> nn.Module:
    """The U-Net of the preset (or ``model.pretrained``) with both LoRA sets and, with FRAMER on,
    the alignment heads; every init seeded by ``train.seed`` alone. ``pisasr.init_from`` is
    loaded here, on every rank, before the backend wraps the model."""
    from .loading import build_model

    sec = section(cfg)
    model = build_model(cfg.model.preset, cfg.model.pretrained, heads=cfg.framer.enabled,
                        head_seed=cfg.train.seed, lora_rank=sec.lora_rank,
                        lora_alpha=sec.lora_alpha, lora_seed=cfg.train.seed)
    if sec.init_from:
        # a checkpoint root is pinned to the step folder its `latest` names now: the export and
        # the analysis rebuild the frozen pix set from it later (config.toml records it)
        sec.init_from = str(_pinned(Path(sec.init_from).expanduser()))
        init_from(model, sec.init_from, ema=cfg.train.ema)
    elif cfg.train.mode == "sem":
        _say("WARNING: train.mode = 'sem' without pisasr.init_from: the frozen pix set is "
             "untrained (its B matrices are zero); stage 2 normally starts from stage 1's checkpoint")
    return model


def _pinned(path: Path) -> Path:
    """A checkpoint root -> the step folder its ``latest`` names; anything else as it is."""
    from framer_dist.checkpoint import find_checkpoint, is_checkpoint_path, is_valid_checkpoint

    if is_checkpoint_path(path) and not is_valid_checkpoint(path):
        try:
            return find_checkpoint(path, str(path)) or path
        except FileNotFoundError as e:
            raise ConfigError(str(e).replace("checkpoint.resume", "pisasr.init_from")) from None
    return path


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        log.info(line)


def init_from(model: nn.Module, path: str | Path, quiet: bool = False, ema: bool = False) -> None:
    """Load stage 1's result into ``model``: a trainer checkpoint (a ``step_*`` folder or the
    checkpoint root: its trained tensors, the heads among them; with ``ema`` (this run keeps an
    EMA too) its EMA weights when that run kept one) or an export folder / file
    (:data:`LORA_FILE`: both LoRA sets, no heads; the heads keep their fresh init; ``export/ema``
    holds the EMA weights)."""
    from framer_dist.checkpoint import is_checkpoint_path, run_config
    from framer_dist.parallel import read_checkpoint_weights

    p = Path(path).expanduser()
    where = "config key 'pisasr.init_from'"
    if not p.exists():
        raise ConfigError(f"{where}: not found: {p}")
    lora_file = p if p.is_file() else next(
        (f for f in (p / LORA_FILE, p / "export" / LORA_FILE) if f.is_file()), None)
    if is_checkpoint_path(p):
        # the EMA is carried from stage 1 into stage 2 where both keep one
        use_ema = ema and bool(run_config(p).get("train", {}).get("ema"))
        state = read_checkpoint_weights(p, ema=use_ema)
        what = f"checkpoint {p}" + (" (its EMA weights)" if use_ema else "")
        if ema and not use_ema and not quiet:
            _say(f"pisasr.init_from: {p}'s run kept no EMA: starting from its weights")
    elif lora_file is not None:
        from safetensors.torch import load_file
        try:
            state = load_file(str(lora_file))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            hint = (" (PiSA-SR's release? tools/import_pisasr.py turns it into an export)"
                    if lora_file.suffix in (".pkl", ".pt", ".pth", ".bin") else "")
            raise ConfigError(f"{where}: {lora_file} is not a safetensors LoRA export "
                              f"({type(e).__name__}: {e}){hint}") from None
        what = f"export {lora_file}"
    else:
        raise ConfigError(f"{where}: {p} is neither a trainer checkpoint (step_* folder with "
                          f"COMPLETE, or a checkpoint root) nor an export ({LORA_FILE})")
    try:
        n = copy_weights(model, state, f"{where}: {what}", ignore=("framer_heads.",))
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
    if quiet:
        return
    heads = [k for k, _ in model.named_parameters() if k.startswith("framer_heads.")]
    if heads and not any(k in state for k in heads):
        _say(f"pisasr.init_from: {what} holds no FRAMER heads: they start from their "
             "orthogonal init")
    _say(f"pisasr.init_from: {n} tensors from {what}")


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    """The stage's LoRA set, plus the heads when FRAMER runs in this stage (``head_train``)."""
    from .lora import apply_stage

    heads = framer_on(cfg) and section(cfg).head_train and model.framer_heads is not None
    return apply_stage(model, cfg.train.mode, train_heads=heads)


@dataclass
class Helpers:
    """What every step gets besides the trained U-Net (``StepContext.helpers``)."""

    frozen: Any                                     # training.Helpers: VAE, LPIPS, CSD, prompts
    block_grids: Callable[[tuple[int, int]], list[tuple[int, int]]]


def helpers(model: nn.Module, cfg: Config, device: torch.device) -> Helpers:
    """The frozen VAE (``data.vae``, or the tiny random one), and in stage ``sem`` LPIPS-VGG, the
    CSD U-Net and the negative prompt: replicated on every rank, outside the engine; bf16 on a
    GPU under bf16 training."""
    from framer_dist.data import load_vae

    from . import training
    from .loading import build_unet
    from .losses import CSDLoss, ddpm_alphas_cumprod

    sec = section(cfg)
    dtype = (torch.bfloat16 if cfg.train.precision == "bf16" and device.type == "cuda"
             else torch.float32)
    vae = load_vae(cfg.data, cfg.model.family, device=device, dtype=dtype).vae
    frozen = training.Helpers(vae=vae, scaling=float(vae.config.scaling_factor),
                              null_embeds=null_prompt(cfg).to(device))
    if cfg.train.mode == "sem":
        frozen.lpips = _lpips(sec, device, dtype)
        with torch.random.fork_rng(devices=[]):
            # without pretrained weights: the trained U-Net's own init (train() seeds it so)
            torch.manual_seed(cfg.train.seed)
            unet = build_unet(cfg.model.preset, sec.csd_pretrained or cfg.model.pretrained,
                              device=device, dtype=dtype)
        frozen.csd = CSDLoss(unet.eval().requires_grad_(False), ddpm_alphas_cumprod())
        frozen.negative_embeds = negative_prompt(cfg).to(device)
    return Helpers(frozen, model.block_grids)


def _lpips(sec: PiSASRConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from .lpips import load_lpips, random_lpips

    if sec.lpips_vgg or sec.lpips_lin:
        return load_lpips(sec.lpips_vgg, sec.lpips_lin, device=device, dtype=dtype)
    _say("WARNING: pisasr.lpips_vgg and pisasr.lpips_lin are empty: stage 'sem' uses a RANDOM "
         "LPIPS network (tests and the CPU demo only; docs/framer_u.md says how to get the files)")
    return random_lpips(0, device=device, dtype=dtype)


def null_prompt(cfg: Config) -> Tensor:
    """The empty prompt ``[1, T, D]`` the step swaps in (``data.null_prompt_prob``): the cache's
    ``empty.safetensors``, or zeros as the loader's null prompt for random prompts."""
    if cfg.data.prompt_embeddings:
        from framer_dist.data.prompts import PromptStore

        return PromptStore(cfg.data.prompt_embeddings).empty[0].float().unsqueeze(0)
    d, _ = text_dims(cfg)
    return torch.zeros(1, cfg.data.prompt_len, d)


def negative_prompt(cfg: Config) -> Tensor:
    """CSD's negative prompt ``[1, T, D]``: ``negative.safetensors`` of data.prompt_embeddings
    (``tools/encode_prompts.py --negative TEXT``), or a fixed random prompt when prompts are random."""
    from framer_dist.data.prompts import NEGATIVE_FILE, random_prompt

    if cfg.data.prompt_embeddings:
        from safetensors.torch import load_file

        f = Path(cfg.data.prompt_embeddings) / NEGATIVE_FILE
        if not f.is_file():
            raise ConfigError(f"config key 'data.prompt_embeddings': {f} not found; stage 'sem' "
                              "needs CSD's negative prompt (tools/encode_prompts.py --negative TEXT "
                              "writes it)")
        return load_file(str(f))["prompt_embeds"].float().unsqueeze(0)
    d, _ = text_dims(cfg)
    return random_prompt(NEGATIVE_SEED, cfg.data.prompt_len, d, 0)[0].unsqueeze(0)


def step(model: Callable, batch: dict[str, Any], ctx: StepContext) -> StepOutput:
    """One micro-batch of the stage (``training.train_step``): pixel batch in, the stage's loss,
    its terms (mse, lpips, csd) and, with FRAMER on in this stage, the per-block features (the
    last is the teacher: the real output) with the coarse students' HF terms switched off."""
    from framer_dist.data import degrade_batch

    from .losses import StageWeights
    from .training import train_step
    from .unet import hf_student_mask

    cfg, sec, h = ctx.cfg, section(ctx.cfg), ctx.helpers
    if "hr" not in batch:
        batch = degrade_batch(batch)
    on = framer_on(cfg)
    # the U-Net gets the empty prompt with data.null_prompt_prob (keyed per sample); CSD's
    # positive branch keeps the tag prompt, as in PiSA-SR (own_null_prompt: the loader keeps it)
    res = train_step(model, h.frozen, batch["lr"], batch["hr"], batch["prompt_embeds"],
                     ctx.positions, seed=cfg.train.seed, stage=cfg.train.mode,
                     readout=cfg.framer.feature if on else None,
                     null_prob=cfg.data.null_prompt_prob,
                     weights=StageWeights(sec.weight_l2, sec.weight_lpips, sec.weight_csd),
                     autocast=ctx.autocast)
    if not on:
        return StepOutput(res.loss, parts=res.parts)
    grid = tuple(res.features.shape[-2:])
    # the rule is about the radial LF radius; other masks do not split at a radius
    mode = sec.hf_coarse if cfg.framer.mask == "radial" else "keep"
    students = hf_student_mask(h.block_grids(res.z_h.shape[-2:])[:-1], grid, cfg.framer.radius,
                               mode)
    hf = torch.cat([students, torch.ones(1, dtype=torch.bool)])  # the last layer: the teacher
    return StepOutput(res.loss, res.features, hf_layers=hf, parts=res.parts)


def export(cfg: Config, kinds: list[str], state: dict[str, Tensor], root: Path) -> dict[str, Path]:
    """``lora`` -> :data:`LORA_FILE` (both sets' adapter tensors under the model's parameter
    names; ``pisasr.init_from`` and framer-sr read it), ``diffusers`` -> ``unet/``, the stock
    ``UNet2DConditionModel`` with both sets merged in. Neither holds the FRAMER heads."""
    from framer_dist.atomic import save_safetensors_atomic

    from .loading import build_model
    from .lora import is_lora_key, lora_set, merge_sets

    sec = section(cfg)
    # Only the stage's own set comes from ``state`` (the gathered fp32 masters). The frozen
    # weights - the base U-Net and the other set - never change, and a backend may hold them
    # rounded (bf16 under DeepSpeed or train.frozen_bf16): they are rebuilt in fp32 as the run
    # started from them (train()'s seed, then pisasr.init_from).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        plain = build_model(cfg.model.preset, cfg.model.pretrained, heads=False,
                            lora_rank=sec.lora_rank, lora_alpha=sec.lora_alpha,
                            lora_seed=cfg.train.seed)
    if sec.init_from:
        init_from(plain, sec.init_from, quiet=True, ema=cfg.train.ema)
    stage_set = {k for k, _ in plain.named_parameters() if lora_set(k) == cfg.train.mode}
    missing = sorted(stage_set - set(state))
    if missing:
        raise RuntimeError(f"export: the gathered state lacks {len(missing)} tensors of the "
                           f"{cfg.train.mode} set, e.g. {missing[0]!r}")
    copy_weights(plain, {k: state[k] for k in stage_set}, "export")
    body = dict(plain.state_dict())
    out: dict[str, Path] = {}
    if "lora" in kinds:
        lora = {k: v.detach().float().cpu().contiguous() for k, v in body.items() if is_lora_key(k)}
        meta = {"format": "pt", "family": "pisasr", "preset": cfg.model.preset,
                "lora_rank": str(sec.lora_rank), "lora_alpha": str(sec.lora_alpha)}
        out["lora"] = save_safetensors_atomic(lora, root / LORA_FILE, metadata=meta)
    if "diffusers" in kinds:
        unet = merge_sets(plain)
        (root / UNET_DIR).mkdir(parents=True, exist_ok=True)
        unet.save_pretrained(str(root / UNET_DIR), safe_serialization=True)
        out["diffusers"] = root / UNET_DIR
    return out


def check(cfg: Config) -> None:
    """Keys and files the family needs, before any process group."""
    from framer_dist.preflight import need_path

    sec = section(cfg)
    # the teacher is the real output z_H, detached, never a head readout nor a student
    if cfg.framer.teacher_layer != -1:
        raise ConfigError("config key 'framer.teacher_layer': the pisasr family's teacher is the "
                          f"real output (-1), got {cfg.framer.teacher_layer}")
    last = len(PRESETS[cfg.model.preset]["down_block_types"]) * 2  # down blocks, mid, up blocks
    st = cfg.framer.students
    if st == "all" or (isinstance(st, list) and any(i in (-1, last) for i in st)):
        raise ConfigError(f"config key 'framer.students': the pisasr family's last block (the real "
                          f"output, the teacher) cannot be a student, got {st!r}")
    bad = [s for s in sec.framer_stages if s not in MODES]
    if bad:
        raise ConfigError(f"config key 'pisasr.framer_stages': {bad[0]!r} is not a stage; allowed "
                          f"values: {', '.join(map(repr, MODES))}")
    if cfg.data.source not in ("folder", "webdataset"):
        raise ConfigError(f"config key 'data.source': the pisasr family trains on images ('folder' "
                          f"or 'webdataset': its step degrades and encodes them), got "
                          f"{cfg.data.source!r}")
    need_path("model.pretrained", cfg.model.pretrained, "dir")
    if cfg.model.pretrained:
        from .loading import PretrainedLoadError, check_geometry, read_unet_config, resolve_unet_dir
        try:
            folder = resolve_unet_dir(cfg.model.pretrained)
            check_geometry(read_unet_config(folder), cfg.model.preset, str(folder / "config.json"))
        except PretrainedLoadError as e:
            raise ConfigError(str(e)) from None
    need_path("pisasr.init_from", sec.init_from, "any")
    need_path("pisasr.csd_pretrained", sec.csd_pretrained, "dir")
    if cfg.train.mode == "sem":
        for key in ("lpips_vgg", "lpips_lin"):
            need_path(f"pisasr.{key}", getattr(sec, key), "file")
        if bool(sec.lpips_vgg) != bool(sec.lpips_lin):
            raise ConfigError("config keys 'pisasr.lpips_vgg' and 'pisasr.lpips_lin': give both "
                              "LPIPS weight files, or neither (random LPIPS, tests only)")


def text_encoder(folder: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, tokens: int | None = None) -> Callable:
    """SD2.1's CLIP text encoder from a local SD2.1 folder (``text.py``); ``tokens``: 77 default."""
    from .text import SD21TextEncoder

    return SD21TextEncoder(folder, device=str(device), dtype=dtype, tokens=tokens or 77)


def text_dims(cfg: Config) -> tuple[int, int]:
    """The preset's cross-attention width (SD2.1: OpenCLIP-H's 1024); no pooled embedding."""
    return TEXT_DIMS[cfg.model.preset], 0


FAMILY = register_family(ModelFamily(
    name="pisasr", presets=tuple(PRESETS), modes=MODES, build=build, trainable=trainable,
    step=step, base_loss_name="stage", export_kinds=EXPORTS, export=export, check=check,
    text_dims=text_dims, config=PiSASRConfig, latents=CODEC, helpers=helpers, takes_pixels=True,
    text_encoder=text_encoder, inference=INFERENCE, own_null_prompt=True))
