"""The super-resolution pipeline (docs/inference.md; DiT4SR's: docs/specs/dit4sr.md "Inference").

LR image -> bicubic x ``scale`` (any factor) -> optionally up to ``process_size`` on the short
side (DiT4SR runs at >= 512 px) -> padded to a multiple of VAE factor x the model's latent multiple
-> VAE latent (the condition) -> the model family's sampler on the latent grid (dit4sr: FlowMatch
Euler from seeded noise, CFG on the text with the LR latent in both branches, latent tiling for
large images) -> VAE decode -> back to the target size -> colour fix against the bicubic image ->
clamp to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from framer_dist.config import ConfigError
from framer_dist.models import DEFAULT_FAMILY, ModelFamily, get_family

from .colorfix import color_fix
from .io import InferenceError
from .loading import VaeCodec
from .prompts import NEGATIVE_PROMPT, POSITIVE_SUFFIX, PromptEncoder, with_suffix
from .tiling import num_tiles


@dataclass
class InferenceOptions:
    """The options every family's sampler gets; the defaults are DiT4SR's (a family's
    ``InferenceSpec.defaults`` replace them for framer-sr flags not given)."""

    steps: int = 40                      # sampling steps (DiT4SR: 40 Euler steps)
    guidance: float = 8.0                # CFG scale on the text (DiT4SR: 8; 1 = off)
    scale: float = 4.0                   # output size = input size x scale (any factor)
    tile: int = 64                       # latent tile side (64 = 512 px at a /8 VAE)
    overlap: int = 24                    # latent tile overlap
    tile_std: float = 0.1                # Gaussian blend std as a fraction of the tile side
    tile_batch: int = 1                  # tiles per forward call
    color_fix: str = "adain"             # adain | wavelet | none
    process_size: int = 512              # short side is brought up to this before encoding (0 = off)
    seed: int = 0
    shift: float = 3.0                   # flow sigma shift, SD3's (ignored with a scheduler config)
    positive_suffix: str = POSITIVE_SUFFIX
    negative_prompt: str = NEGATIVE_PROMPT
    scheduler_config: dict | None = field(default=None, repr=False)  # the base folder's scheduler/
    family_options: dict[str, Any] = field(default_factory=dict)   # the family's own flags (by dest)

    def check(self) -> None:
        if self.steps < 1:
            raise InferenceError(f"--steps must be >= 1, got {self.steps}")
        if self.scale <= 0:
            raise InferenceError(f"--scale must be > 0, got {self.scale}")
        if not 0 <= self.overlap < self.tile:
            raise InferenceError(f"--tile-overlap must be in [0, tile={self.tile}), got {self.overlap}")
        if self.color_fix not in ("adain", "wavelet", "none"):
            raise InferenceError(f"--color-fix must be adain, wavelet or none, got {self.color_fix!r}")


class SRPipeline:
    """``pipe(lr [B,3,h,w] in [0,1], captions) -> sr [B,3,round(h*s),round(w*s)] in [0,1]``.

    ``family``: the model's family (a name or the family; None = the default family, for a model
    of no recorded family); its ``inference`` samples on the latent grid."""

    def __init__(self, model, vae: VaeCodec, text: PromptEncoder | None,
                 options: InferenceOptions | None = None, dtype: torch.dtype | None = None,
                 family: str | ModelFamily | None = None):
        try:
            self.family = family if isinstance(family, ModelFamily) else get_family(family or DEFAULT_FAMILY)
            self.inference = self.family.part("inference")
        except ConfigError as e:
            raise InferenceError(str(e)) from None
        self.model, self.vae, self.text = model, vae, text
        self.opt = options or InferenceOptions()
        self.opt.check()
        self.dtype = dtype or next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        shape = self.inference.shape(model)
        self.multiple = shape.multiple
        if vae.channels != shape.channels:
            raise InferenceError(f"the VAE has {vae.channels} latent channels but the model "
                                 f"expects {shape.channels}")
        if self.opt.tile % self.multiple or self.opt.overlap % self.multiple:
            raise InferenceError(f"--tile ({self.opt.tile}) and --tile-overlap ({self.opt.overlap}) "
                                 f"must be multiples of the model's latent grid {self.multiple} "
                                 "(e.g. a transformer's patch size)")

    def encode_prompts(self, captions: list[str]) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        if self.text is None:
            raise InferenceError("captions given but the pipeline has no text encoder")
        cond = self.text([with_suffix(c, self.opt.positive_suffix) for c in captions])
        uncond = self.text([self.opt.negative_prompt]) if self.opt.guidance != 1.0 else None
        return cond, uncond

    @torch.no_grad()
    def __call__(self, lr: Tensor, captions: list[str] | None = None, seed: int | None = None,
                 progress: Callable[[int], None] | None = None,
                 embeddings: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None] | None = None
                 ) -> Tensor:
        """``captions`` (suffix added here) or precomputed ``embeddings=(cond, uncond)``."""
        if lr.ndim != 4 or lr.shape[1] != 3:
            raise InferenceError(f"expected LR images [B, 3, H, W], got {tuple(lr.shape)}")
        if embeddings is None and (captions is None or len(captions) != lr.shape[0]):
            raise InferenceError(f"{0 if captions is None else len(captions)} captions for "
                                 f"{lr.shape[0]} images")
        o = self.opt
        h, w = lr.shape[-2:]
        th, tw = max(1, round(h * o.scale)), max(1, round(w * o.scale))
        lr = lr.float().to(self.device)
        ref = F.interpolate(lr, size=(th, tw), mode="bicubic", align_corners=False).clamp(0, 1)

        # work size: short side >= process_size, then padded to the latent grid
        k = max(1.0, o.process_size / min(th, tw)) if o.process_size else 1.0
        wh, ww = round(th * k), round(tw * k)
        x = ref if (wh, ww) == (th, tw) else F.interpolate(lr, size=(wh, ww), mode="bicubic",
                                                           align_corners=False).clamp(0, 1)
        m = self.vae.factor * self.multiple
        ph, pw = (-wh) % m, (-ww) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        lr_latent = self.vae.encode(x).to(self.device)

        cond, uncond = embeddings if embeddings is not None else self.encode_prompts(captions)
        cond = tuple(t.to(self.device) for t in cond)
        uncond = tuple(t.to(self.device) for t in uncond) if uncond is not None else None
        # the seed keys the image, not the batch: an image's result does not depend on its batch
        z = self.inference.sample(self.model, lr_latent, cond, uncond, o,
                                  seed=o.seed if seed is None else seed, dtype=self.dtype,
                                  progress=progress)

        self.last_latent = z  # kept for diagnostics (seam checks in the tests)
        out = self.vae.decode(z)[..., :wh, :ww]
        if (wh, ww) != (th, tw):
            out = F.interpolate(out, size=(th, tw), mode="bicubic", align_corners=False)
        out = color_fix(out.float(), ref, o.color_fix)
        return out.clamp(0, 1)

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        """The latent grid an ``h x w`` LR image is sampled on (for tile counts and docs)."""
        o = self.opt
        th, tw = max(1, round(h * o.scale)), max(1, round(w * o.scale))
        k = max(1.0, o.process_size / min(th, tw)) if o.process_size else 1.0
        m = self.vae.factor * self.multiple
        wh, ww = round(th * k), round(tw * k)
        return (wh + (-wh) % m) // self.vae.factor, (ww + (-ww) % m) // self.vae.factor

    def tiles_for(self, h: int, w: int) -> int:
        return num_tiles(*self.latent_size(h, w), self.opt.tile, self.opt.overlap)
