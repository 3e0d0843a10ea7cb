"""Load what inference needs: the transformer from any export kind, and the VAE.

Checkpoint kinds (``--kind auto`` recognises them by their files):

- ``full``: a diffusers-layout transformer folder (``config.json`` + safetensors, or a pipeline
  root with ``transformer/``), as written by ``framer_dist.models.save_model``.
- ``control``: ``dit4sr_control.safetensors`` (the DiT4SR layers only) on top of ``--base``, the
  stock SD3/SD3.5 folder it was trained from.
- ``lora``: ``pytorch_lora_weights.safetensors`` on top of ``--base``; a control file in the same
  folder or the one above (LoRA mode trains the control layers too) is loaded as well.

A folder holding several exports (e.g. the trainer's ``export/`` with ``transformer/`` and
``dit4sr_control.safetensors``) resolves to the full one first.

Weights (``weights``, ``--weights ema|main``): with ``train.ema`` the trainer also writes the
same exports from the EMA weights under ``export/ema/``. A checkpoint folder holding an ``ema/``
export loads the EMA weights by default (the convention of diffusers/DiT4SR training scripts,
whose EMA weights are the ones meant for inference); ``main`` loads the last step's weights
beside it. ``load_transformer`` reports which through ``report`` (one line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from framer_dist.models import DEFAULT_FAMILY, LatentCodec, get_family

from .io import InferenceError

CONTROL_FILE = "dit4sr_control.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
KINDS = ("auto", "full", "control", "lora")
WEIGHTS = ("ema", "main")
EMA_DIR = "ema"  # the trainer's export/ema/ (framer_dist.train.export)


def _is_full(p: Path) -> bool:
    return (p / "config.json").is_file() or (p / "transformer" / "config.json").is_file()


def detect_kind(path: str | Path, skip: tuple[str, ...] = ()) -> tuple[str, Path]:
    """(kind, the path to load) for a checkpoint file or folder; raises naming what was looked for.
    ``skip``: names of sub-folders not to look in."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InferenceError(f"checkpoint not found: {p}")
    if p.is_file():
        if p.name.endswith(".safetensors"):
            return ("lora" if "lora" in p.name else "control"), p
        raise InferenceError(f"checkpoint {p} is a file but not .safetensors")
    candidates = [p] + sorted(d for d in p.iterdir() if d.is_dir() and d.name not in skip)
    for c in candidates:
        if _is_full(c):
            return "full", c
    for c in candidates:
        if (c / LORA_FILE).is_file():
            return "lora", c / LORA_FILE
    for c in candidates:
        if (c / CONTROL_FILE).is_file():
            return "control", c / CONTROL_FILE
    raise InferenceError(f"{p} holds no checkpoint: looked for config.json (full transformer), "
                         f"{LORA_FILE} (LoRA) or {CONTROL_FILE} (control layers) in it and its "
                         "sub-folders")


def resolve_checkpoint(checkpoint: str | Path, kind: str = "auto", weights: str | None = None
                       ) -> tuple[str, Path, str]:
    """(kind, the path to load, a description of the weights chosen) for ``checkpoint``.

    ``weights``: ``None`` = the EMA export when ``checkpoint`` holds one (``ema/``), else what it
    holds; ``"ema"`` / ``"main"`` insist (an error when there is no such choice to make)."""
    if kind not in KINDS:
        raise InferenceError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if weights not in (None, *WEIGHTS):
        raise InferenceError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    p = Path(checkpoint).expanduser()
    beside = p.is_dir() and (p / EMA_DIR).is_dir()
    # a path into the EMA export itself: ema/, ema/transformer, ema/lora/<file>
    inside = not beside and EMA_DIR in p.resolve().parts[-3:]
    if beside and weights in (None, "ema"):
        found_kind, path = detect_kind(p / EMA_DIR)
        which = "EMA weights (--weights main for the last step's)"
    elif beside:
        found_kind, path = detect_kind(p, skip=(EMA_DIR,))
        which = "main weights, the last step's (--weights ema for the EMA export)"
    else:
        if weights == "ema" and not inside:
            raise InferenceError(f"--weights ema: {p} holds no EMA export (an {EMA_DIR}/ folder, "
                                 "written by the trainer with train.ema = true)")
        if weights == "main" and inside:
            raise InferenceError(f"--weights main: {p} is inside an EMA export ({EMA_DIR}/); point "
                                 "--checkpoint at the export folder above it")
        found_kind, path = detect_kind(p)
        which = "EMA weights" if inside else "main weights"
    if kind != "auto" and kind != found_kind:
        raise InferenceError(f"--kind {kind}: {checkpoint} looks like a {found_kind} checkpoint ({path})")
    return found_kind, path, which


def load_transformer(checkpoint: str | Path, *, kind: str = "auto", base: str | Path | None = None,
                     device: Any = None, dtype: torch.dtype | None = None,
                     weights: str | None = None, report: Callable[[str], None] | None = None):
    """The DiT4SR transformer of ``checkpoint`` in eval mode (``weights``: see
    :func:`resolve_checkpoint`); ``report`` gets one line saying what is loaded."""
    from framer_dist.models.dit4sr import PretrainedLoadError, load_control, load_lora, load_pretrained

    found_kind, path, which = resolve_checkpoint(checkpoint, kind, weights)
    if report is not None:  # name the folder the weights come from (a pipeline root's transformer/)
        shown = path / "transformer" if found_kind == "full" and not (path / "config.json").is_file() \
            else path
        report(f"loading the {found_kind} checkpoint {shown}: {which}")
    try:
        if found_kind == "full":
            model = load_pretrained(path)
        else:
            if not base:
                raise InferenceError(f"{path} is a {found_kind} checkpoint: it needs --base, the "
                                     "pretrained SD3/SD3.5 folder (or full checkpoint) it was trained on")
            if not Path(base).exists():
                raise InferenceError(f"--base folder not found: {base}")
            model = load_pretrained(base)
            if found_kind == "control":
                control = path
            else:  # next to the adapter, or one up: the trainer writes export/dit4sr_control.safetensors
                # and export/lora/pytorch_lora_weights.safetensors
                control = next((d / CONTROL_FILE for d in (path.parent, path.parent.parent)
                                if (d / CONTROL_FILE).is_file()), None)
            if control is not None:
                load_control(model, control)
            if found_kind == "lora":
                load_lora(model, path)
    except PretrainedLoadError as e:
        raise InferenceError(str(e)) from None
    except (ValueError, FileNotFoundError) as e:
        raise InferenceError(f"cannot load {found_kind} checkpoint {path}: {e}") from None
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
