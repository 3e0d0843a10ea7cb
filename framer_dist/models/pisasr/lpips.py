"""LPIPS-VGG (v0.1) in plain torch, without torchvision (the ``lpips`` package depends on it).

The network is lpips' ``LPIPS(net="vgg", version="0.1")`` in eval mode: lpips' scaling layer, the
VGG16 feature stack cut after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, channel-wise unit
normalisation, squared differences, the five learned 1x1 linear layers (non-negative weights, no
bias) and a spatial mean, summed over the five layers. Inputs are images in [-1, 1].

Weights, both local files read with ``torch.load(weights_only=True)`` (or safetensors):

- VGG16 in torchvision's layout: keys ``features.N.weight`` / ``features.N.bias`` (N the conv
  indices 0, 2, 5, ..., 28; ``classifier.*`` keys are ignored), e.g. torchvision's
  ``vgg16-397923af.pth``;
- the LPIPS v0.1 linear layers: keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``, the
  file ``lpips/weights/v0.1/vgg.pth`` that the lpips wheel carries as package data.

A missing or unfitting file is a one-line :class:`LPIPSWeightsError` naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .. import ModelLoadError

# torchvision's vgg16 "D" configuration: channels, "M" = 2x2 max-pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# lpips' slices of vgg.features: [0:4], [4:9], [9:16], [16:23], [23:30]
_CUTS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)
# lpips.pretrained_networks.ScalingLayer
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPSWeightsError(ModelLoadError):
    """An LPIPS weight file is missing or does not fit (one line naming the file)."""


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            c_in = v
    return nn.Sequential(*layers)


class _Linear(nn.Module):
    """lpips' NetLinLayer (dropout, then a 1x1 conv without bias): ``model.1.weight``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1: ``forward(x, y)`` -> per-image distance ``[B]`` (images in [-1, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()[: _CUTS[-1]]
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", _Linear(c))
        self.eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        out, start = [], 0
        for cut in _CUTS:
            for layer in self.features[start:cut]:
                x = layer(x)
            out.append(x)
            start = cut
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS: expected two [B, 3, H, W] images of one shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        dt = self.features[0].weight.dtype
        b = x.shape[0]
        both = torch.cat([x, y]).to(dt)
        both = (both - self.shift.to(dt)) / self.scale.to(dt)
        total = None
        for k, f in enumerate(self._taps(both)):
            n = f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + 1e-10)
            d = (n[:b] - n[b:]) ** 2
            v = getattr(self, f"lin{k}")(d).mean(dim=(2, 3))  # [B, 1]
            total = v if total is None else total + v
        return total.reshape(b)


def _load_file(path: str | Path, what: str) -> dict[str, Tensor]:
    p = Path(path).expanduser()
    if not str(path) or not p.is_file():
        raise LPIPSWeightsError(f"{what} not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(p)
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LPIPSWeightsError(f"{what} {p} cannot be read: {first}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise LPIPSWeightsError(f"{what} {p} is not a state dict of tensors")
    return sd


def _fill(module: nn.Module, sd: dict[str, Tensor], prefix: str, path: str | Path, what: str) -> None:
    own = {k: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    for k, v in own.items():
        if k not in sd:
            raise LPIPSWeightsError(f"{what} {path} has no key {k!r}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise LPIPSWeightsError(f"{what} {path}: key {k!r} has shape {tuple(sd[k].shape)}, "
                                    f"expected {tuple(v.shape)}")
    module.load_state_dict({k: sd[k] for k in own}, strict=False)


def random_lpips(seed: int = 0, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> LPIPS:
    """LPIPS with random weights, frozen (tests and the CPU demo; no files). The linear layers are
    made non-negative, as lpips' training keeps them, so the distance stays >= 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LPIPS()
    with torch.no_grad():
        for k in range(len(CHANNELS)):
            w = getattr(net, f"lin{k}").model[1].weight
            w.abs_()
    net.requires_grad_(False)
    if device is not None or dtype is not None:
        net.to(device=device, dtype=dtype)
    return net


def load_lpips(vgg_path: str | Path, lin_path: str | Path, *, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> LPIPS:
    """LPIPS-VGG from the two local weight files, frozen, in eval mode."""
    vgg = _load_file(vgg_path, "LPIPS VGG16 weights (torchvision layout)")
    lin = _load_file(lin_path, "LPIPS v0.1 linear-layer weights (lpips/weights/v0.1/vgg.pth)")
    net = LPIPS()
    _fill(net, vgg, "features.", vgg_path, "LPIPS VGG16 weights (torchvision layout)")
    _fill(net, lin, "lin", lin_path, "LPIPS v0.1 linear-layer weights (lpips/weights/v0.1/vgg.pth)")
    net.requires_grad_(False)
    net.eval()
    if device is not None or dtype is not None:
        net.to(device=device, dtype=dtype)
    return net
