"""A second model family defined outside framer_dist/models/ (``model.family =
"_toy_family:FAMILY"``): a plain conv net on the 16-channel latents with three blocks and an x0
readout, to prove the seam. Its blocks are FSDP2 units and checkpointing units like DiT4SR's. Its
latents are the DiT4SR family's (SD3's 16-channel codec): a family may share another's parts. Its
inference is one step (the last block's x0) with a family flag, ``--toy-gain``, and one default
(``steps = 1``); its analysis readout gives a teacher of its own (the LR latent)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from pathlib import Path

from framer_dist.models import (InferenceSpec, ModelFamily, ModelLoadError, ModelShape, StepContext,
                                StepOutput, get_family)

CHANNELS = 16  # the latent codec's channels


class ToyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.silu(self.conv(h))


class ToyNet(nn.Module):
    readout_head_modules = ("head",)  # used after every block: kept whole by the backends

    def __init__(self, width: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(CHANNELS, width, 3, padding=1)
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(blocks))
        self.head = nn.Conv2d(width, CHANNELS, 1)
        self._ac: frozenset[int] = frozenset()
        self.block_calls = 0  # forward calls of blocks, recomputation included

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def set_activation_checkpointing(self, indices) -> None:
        self._ac = frozenset(int(i) for i in indices)

    def _block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        self.block_calls += 1
        return self.blocks[i](h)

    def forward(self, lr_latent: torch.Tensor) -> torch.Tensor:
        """x0 predictions after every block, [L, B, C, H, W] (the last one is the output)."""
        h = self.stem(lr_latent)
        out = []
        for i in range(self.num_blocks):
            if i in self._ac and torch.is_grad_enabled():
                h = checkpoint(self._block, i, h, use_reentrant=False)
            else:
                h = self._block(i, h)
            out.append(lr_latent + self.head(h))  # each block's readout, taken once, here
        return torch.stack(out)


def step(model, batch, ctx: StepContext) -> StepOutput:
    with ctx.autocast:
        feats = model(batch["lr_latent"].float())
    loss = F.mse_loss(feats[-1].float(), batch["hr_latent"].float())
    return StepOutput(loss, feats.float() if ctx.cfg.framer.enabled else None)


WEIGHTS = "toy.safetensors"
SAMPLED: list = []  # the options each sample() call got (tests read them)


def detect(path: Path, skip) -> tuple[str, Path]:
    f = path if path.is_file() else path / WEIGHTS
    if f.name != WEIGHTS or not f.is_file():
        raise ModelLoadError(f"{path} holds no {WEIGHTS}")
    return "full", f


def load(kind: str, path: Path, base) -> ToyNet:
    from safetensors.torch import load_file

    net = ToyNet()
    net.load_state_dict(load_file(str(path)))
    return net


def sample(model, lr_latent, cond, uncond, opts, *, seed, dtype, progress):
    SAMPLED.append(opts)
    z = model(lr_latent)[-1] * opts.family_options["toy_gain"]
    if progress is not None:
        progress(0)
    return z


def readout(model, x0, lr_latent, sigma, noise, cond, feature):
    return model(lr_latent), lr_latent


INFERENCE = InferenceSpec(
    kinds=("full",), detect=detect, load=load, shape=lambda model: ModelShape(CHANNELS, 1, (8, 8)),
    sample=sample, readout=readout, defaults={"steps": 1},
    arguments=((("--toy-gain",), {"type": float, "default": 1.0, "help": "output scale"}),))

FAMILY = ModelFamily(
    name="toy", presets=("toy",), modes=("all",), build=lambda cfg: ToyNet(),
    trainable=lambda model, cfg: [p for p in model.parameters() if p.requires_grad],
    step=step, base_loss_name="mse", text_dims=lambda cfg: (8, 8),
    latents=get_family("dit4sr").latents, inference=INFERENCE)
