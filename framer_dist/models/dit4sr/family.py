"""DiT4SR as a model family (``model.family = "dit4sr"``, the default): what the trainer gets from
it through :class:`framer_dist.models.ModelFamily`. The base loss is rectified flow
(``framer_dist.flow``); the FRAMER feature of block i is read out through the model's own output
head (``readout``), as docs/specs/framer.md section 1 says."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from framer_dist import flow
from framer_dist.config import Config, ConfigError
from framer_dist.models import (InferenceSpec, ModelFamily, ModelShape, StepContext, StepOutput,
                                register_family)

from .config import MOVED_KEYS, DiT4SRConfig, section
from .checkpoints import KINDS, detect_kind, load_checkpoint
from .latents import CODEC
from .presets import PRESETS
from .readout import readout

# diffusers and peft load only when a model is built: config checks need only the names here

MODES = ("control", "lora", "full")
EXPORTS = ("control", "lora", "diffusers")


def readout_kind(cfg: Config) -> str | None:
    """What the model must read out per block for the configured FRAMER feature (None = off)."""
    if not cfg.framer.enabled:
        return None
    return "hidden" if cfg.framer.feature == "hidden" else "velocity"


def framer_features(out_features: Tensor, x_t: Tensor, sigma: Tensor, feature: str) -> Tensor:
    """The per-block readout -> F^(i) of docs/specs/framer.md section 1 (x0_i = x_t - sigma v_i)."""
    if feature == "x0":
        return flow.x0_from_velocity(x_t, out_features, sigma)
    return out_features


def step(model: Callable, batch: dict[str, Tensor], ctx: StepContext) -> StepOutput:
    """Noise the clean latent (sigma and noise keyed by the samples' global positions), run the
    model once with the per-block readout when FRAMER is on, and return the noise loss and the
    features. ``batch`` holds latents: hr_latent, lr_latent, prompt_embeds, pooled."""
    cfg = ctx.cfg
    x0 = batch["hr_latent"]
    sigma, noise = flow.sample_sigma_and_noise(ctx.positions, tuple(x0.shape[1:]), section(cfg).flow,
                                               cfg.train.seed, device=x0.device)
    x0 = x0.float()
    x_t = flow.add_noise(x0, noise, sigma)
    with ctx.autocast:
        out = model(hidden_states=x_t, lr_latent=batch["lr_latent"],
                    timestep=flow.timesteps(sigma),
                    encoder_hidden_states=batch["prompt_embeds"],
                    pooled_projections=batch["pooled"], readout=readout_kind(cfg))
    loss = flow.noise_loss(out.sample, x_t, x0, noise, sigma, section(cfg).flow.precondition_outputs)
    if not cfg.framer.enabled:
        return StepOutput(loss)
    return StepOutput(loss, framer_features(out.features, x_t, sigma, cfg.framer.feature))


def build(cfg: Config) -> nn.Module:
    from .loading import build_model

    return build_model(cfg.model, lr_injection_scale=section(cfg).lr_injection_scale)


def trainable(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    from .training import apply_training_mode

    return apply_training_mode(model, cfg.train.mode, section(cfg).lora)


def flops(model: nn.Module, cfg: Config) -> Callable[[dict[str, Any]], float]:
    """The MMDiT training-FLOP count (``flops.py``) for a batch of this run; the geometry is read
    from the plain model, before a backend shards it."""
    from .flops import geometry_from_model, train_flops_per_sample

    geometry = geometry_from_model(model)
    readout = readout_kind(cfg) is not None
    lora_rank = section(cfg).lora.rank if cfg.train.mode == "lora" else 0

    def per_sample(batch: dict[str, Any]) -> float:
        return train_flops_per_sample(geometry, tuple(batch["hr_latent"].shape[-2:]),
                                      batch["prompt_embeds"].shape[1], cfg.train.mode,
                                      readout=readout, lora_rank=lora_rank)["total"]

    return per_sample


def export(cfg: Config, kinds: list[str], state: dict[str, Tensor], root: Path) -> dict[str, Path]:
    """Load a full state dict into a plain model of the run's mode and write ``kinds`` to
    ``root``: ``control`` -> ``dit4sr_control.safetensors`` (the DiT4SR layers), ``lora`` -> the
    adapter in the diffusers layout, ``diffusers`` -> the whole transformer (LoRA fused in) in
    the diffusers folder layout, loadable with ``build_model(ModelConfig(pretrained=...))``."""
    from .loading import build_model, save_model
    from .training import apply_training_mode, save_control, save_lora

    plain = build_model(cfg.model, lr_injection_scale=section(cfg).lr_injection_scale)
    apply_training_mode(plain, cfg.train.mode, section(cfg).lora)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export: the gathered state does not fit the model: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")
    out: dict[str, Path] = {}
    if "control" in kinds:
        out["control"] = save_control(plain, root)
    if "lora" in kinds:
        out["lora"] = save_lora(plain, root / "lora")
    if "diffusers" in kinds:
        if cfg.train.mode == "lora":
            plain.fuse_lora()
            plain.unload_lora()
        out["diffusers"] = save_model(plain, root / "transformer")
    return out


@torch.no_grad()
def validate(model: nn.Module, batch: dict[str, Any], cfg: Config, autocast: Any) -> Any:
    """Super-resolve the first images of ``batch`` (10 Euler steps) and return LR | SR | HR as an
    HWC uint8 picture (every rank runs the sampler: under ZeRO-3/FSDP2 the forward is collective)."""
    from .sampler import euler_sample, flow_sigmas, model_denoiser

    n = min(2, batch["lr_latent"].shape[0])
    lr = batch["lr_latent"][:n]
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(cfg.train.seed)
    noise = torch.randn(lr.shape, generator=g).to(lr.device)
    denoise = model_denoiser(model, batch["prompt_embeds"][:n], batch["pooled"][:n])
    with autocast:
        sr = euler_sample(lambda x, s: denoise(x, lr, s), noise, flow_sigmas(10, section(cfg).flow.shift))
    model.train(was_training)
    panels = [lr, sr, batch["hr_latent"][:n]]
    if "hr" in batch:  # pixels are there: decode the latents for a picture a human can judge
        from framer_dist.data import decode_latents
        panels = [batch["lr"][:n], decode_latents(cfg.data, sr, cfg.model.family), batch["hr"][:n]]
    else:
        panels = [p[:, :3] for p in panels]  # a latent preview: the first three channels
    img = torch.cat([torch.cat(list(p.float().cpu()), dim=1) for p in panels], dim=2)  # [3,H*n,W*3]
    return ((img.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()


def check(cfg: Config) -> None:
    """model.pretrained is an SD3/SD3.5 or DiT4SR transformer folder; 'lora' exports need LoRA."""
    from framer_dist.preflight import need_path

    from .loading import PretrainedLoadError, read_transformer_config, resolve_transformer_dir

    need_path("model.pretrained", cfg.model.pretrained, "dir")
    if cfg.model.pretrained:
        try:
            read_transformer_config(resolve_transformer_dir(cfg.model.pretrained))
        except PretrainedLoadError as e:
            raise ConfigError(str(e)) from None
    if "lora" in cfg.checkpoint.export and cfg.train.mode != "lora":
        raise ConfigError("config key 'checkpoint.export': 'lora' needs train.mode='lora', this run "
                          f"trains {cfg.train.mode!r}")


def text_encoder(folder: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, tokens: int | None = None) -> Callable:
    """SD3's CLIP-L + CLIP-G + T5 from a local SD3/SD3.5 folder (``text.py``); ``tokens``: T5
    tokens (None = 77)."""
    from .text import SD3TextEncoders

    return SD3TextEncoders(folder, device=str(device), dtype=dtype,
                           t5_len=77 if tokens is None else tokens)


def text_dims(cfg: Config) -> tuple[int, int]:
    """The preset's joint-attention (T5/CLIP sequence) and pooled widths."""
    from .presets import preset_geometry

    geo = preset_geometry(cfg.model.preset)
    return int(geo["joint_attention_dim"]), int(geo["pooled_projection_dim"])


def shape(model: nn.Module) -> ModelShape:
    """16 latent channels, the patch size, the joint-attention and pooled text widths."""
    c = model.config
    return ModelShape(int(c.in_channels), int(c.patch_size),
                      (int(c.joint_attention_dim), int(c.pooled_projection_dim)))


def sample(model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    """FlowMatch Euler with CFG on the text and latent tiles (``sampler.sample``)."""
    from .sampler import sample as run

    return run(model, *args, **kwargs)


INFERENCE = InferenceSpec(kinds=KINDS, detect=detect_kind, load=load_checkpoint, shape=shape,
                          sample=sample, readout=readout)

FAMILY = register_family(ModelFamily(
    name="dit4sr", presets=tuple(PRESETS), modes=MODES, build=build,
    trainable=trainable, step=step, base_loss_name="noise", export_kinds=EXPORTS, export=export,
    flops=flops, validate=validate, check=check, text_dims=text_dims, config=DiT4SRConfig,
    moved_keys=tuple(MOVED_KEYS.items()), latents=CODEC, text_encoder=text_encoder,
    inference=INFERENCE))
