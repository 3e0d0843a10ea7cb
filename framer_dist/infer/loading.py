"""Load what inference needs: the model from any export of the trainer, and the VAE.

The model family comes from the export's ``family.json`` (written by the trainer beside its
exports, ``framer_dist.export``), or ``--family``; exports without one are the default family's.
The family knows its checkpoint kinds and how to read them (``InferenceSpec.detect``/``load``;
dit4sr: ``models/dit4sr/checkpoints.py``); this module resolves the trainer's export layout.

Weights (``weights``, ``--weights ema|main``): with ``train.ema`` the trainer also writes the
same exports from the EMA weights under ``export/ema/``. A checkpoint folder holding an ``ema/``
export loads the EMA weights by default (the convention of diffusers/DiT4SR training scripts,
whose EMA weights are the ones meant for inference); ``main`` loads the last step's weights
beside it. ``load_model`` reports which through ``report`` (one line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from framer_dist.export import read_family
from framer_dist.models import (DEFAULT_FAMILY, LatentCodec, ModelFamily, ModelLoadError, families,
                                get_family)

from .io import InferenceError

WEIGHTS = ("ema", "main")
EMA_DIR = "ema"  # the trainer's export/ema/ (framer_dist.export)


def checkpoint_family(checkpoint: str | Path, family: str | ModelFamily | None = None) -> ModelFamily:
    """The family of ``checkpoint``: ``family`` when given (``--family``), else the one its
    export records, else the default family; it must provide inference."""
    if isinstance(family, ModelFamily):
        fam = family
    else:
        try:
            fam = get_family(family or read_family(checkpoint) or DEFAULT_FAMILY)
        except ValueError as e:  # ConfigError (an unknown family) or an unreadable family.json
            raise InferenceError(str(e).replace("config key 'model.family'", "--family")) from None
    if fam.inference is None:
        raise InferenceError(f"model family {fam.name!r} provides no inference (ModelFamily.inference)")
    return fam


def kinds(family: ModelFamily | None = None) -> tuple[str, ...]:
    """``--kind`` values: "auto" and the family's checkpoint kinds (all registered families')."""
    fams = [family] if family is not None else [f for f in families() if f.inference is not None]
    return ("auto", *dict.fromkeys(k for f in fams for k in f.inference.kinds))


def detect_kind(path: str | Path, family: ModelFamily, skip: tuple[str, ...] = ()) -> tuple[str, Path]:
    """(kind, the path to load) for a checkpoint file or folder, by ``family``'s rules."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InferenceError(f"checkpoint not found: {p}")
    try:
        return family.inference.detect(p, skip)
    except ModelLoadError as e:
        raise InferenceError(str(e)) from None


def resolve_checkpoint(checkpoint: str | Path, kind: str = "auto", weights: str | None = None,
                       family: str | ModelFamily | None = None) -> tuple[str, Path, str]:
    """(kind, the path to load, a description of the weights chosen) for ``checkpoint``.

    ``weights``: ``None`` = the EMA export when ``checkpoint`` holds one (``ema/``), else what it
    holds; ``"ema"`` / ``"main"`` insist (an error when there is no such choice to make)."""
    fam = checkpoint_family(checkpoint, family)
    allowed = kinds(fam)
    if kind not in allowed:
        raise InferenceError(f"--kind must be one of {', '.join(allowed)}, got {kind!r}")
    if weights not in (None, *WEIGHTS):
        raise InferenceError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    p = Path(checkpoint).expanduser()
    beside = p.is_dir() and (p / EMA_DIR).is_dir()
    # a path into the EMA export itself: ema/, ema/transformer, ema/lora/<file>
    inside = not beside and EMA_DIR in p.resolve().parts[-3:]
    if beside and weights in (None, "ema"):
        found_kind, path = detect_kind(p / EMA_DIR, fam)
        which = "EMA weights (--weights main for the last step's)"
    elif beside:
        found_kind, path = detect_kind(p, fam, skip=(EMA_DIR,))
        which = "main weights, the last step's (--weights ema for the EMA export)"
    else:
        if weights == "ema" and not inside:
            raise InferenceError(f"--weights ema: {p} holds no EMA export (an {EMA_DIR}/ folder, "
                                 "written by the trainer with train.ema = true)")
        if weights == "main" and inside:
            raise InferenceError(f"--weights main: {p} is inside an EMA export ({EMA_DIR}/); point "
                                 "--checkpoint at the export folder above it")
        found_kind, path = detect_kind(p, fam)
        which = "EMA weights" if inside else "main weights"
    if kind != "auto" and kind != found_kind:
        raise InferenceError(f"--kind {kind}: {checkpoint} looks like a {found_kind} checkpoint ({path})")
    return found_kind, path, which


def load_model(checkpoint: str | Path, *, kind: str = "auto", base: str | Path | None = None,
               device: Any = None, dtype: torch.dtype | None = None, weights: str | None = None,
               report: Callable[[str], None] | None = None,
               family: str | ModelFamily | None = None) -> torch.nn.Module:
    """The model of ``checkpoint`` in eval mode, without gradients (``weights``: see
    :func:`resolve_checkpoint`; ``family``: see :func:`checkpoint_family`); ``report`` gets one
    line saying what is loaded."""
    fam = checkpoint_family(checkpoint, family)
    found_kind, path, which = resolve_checkpoint(checkpoint, kind, weights, fam)
    if report is not None:
        report(f"loading the {found_kind} checkpoint {path}: {which}")
    try:
        model = fam.inference.load(found_kind, path, base)
    except ModelLoadError as e:
        raise InferenceError(str(e)) from None
    model.requires_grad_(False)
    return _to(model, device, dtype).eval()


class VaeCodec:
    """Pixels in [0, 1] <-> a family's latents with a diffusers ``AutoencoderKL`` and the family's
    codec (``ModelFamily.latents``; None = the default family's, for a VAE of no recorded family)."""

    def __init__(self, vae, tiling: bool = False, codec: LatentCodec | None = None):
        self.codec = codec if codec is not None else get_family(DEFAULT_FAMILY).part("latents")
        self.vae = vae.eval().requires_grad_(False)
        if tiling:  # diffusers' tiled encode/decode (tiles of the VAE's sample_size) for huge images
            self.vae.enable_tiling()
        cfg = vae.config
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.channels = int(cfg.latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> the family's latents (its codec, as in training)."""
        return self.codec.encode(self.vae, x * 2 - 1, None).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (self.codec.decode(self.vae, z).float() + 1) / 2


def load_vae(path: str | Path | None, device: Any = None, dtype: torch.dtype | None = None,
             tiling: bool = False, codec: LatentCodec | None = None) -> VaeCodec:
    """A local diffusers VAE folder (or a pipeline root with ``vae/``); ``None``/'' = the family's
    tiny random VAE (``codec.tiny_vae()``, what training uses with ``data.vae = ''``). ``codec``:
    the family's latent codec (None = the default family's)."""
    if path:
        from diffusers import AutoencoderKL

        p = Path(path).expanduser()
        folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
        if not (folder / "config.json").is_file():
            raise InferenceError(f"VAE folder not found or without config.json: {p}")
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
    else:
        codec = codec if codec is not None else get_family(DEFAULT_FAMILY).part("latents")
        vae = codec.tiny_vae()
    return VaeCodec(_to(vae, device, dtype), tiling=tiling, codec=codec)


def _to(module, device: Any, dtype: torch.dtype | None):
    """``module.to`` without a no-op dtype argument (diffusers warns on any dtype cast)."""
    if dtype is not None and dtype != next(module.parameters()).dtype:
        module = module.to(dtype=dtype)
    return module.to(device) if device is not None else module
