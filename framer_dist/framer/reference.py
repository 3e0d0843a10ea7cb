"""SLOW plain reference of the FRAMER objective: for tests and the benchmark only, never training.

Written straight from the equations of docs/specs/framer.md, layer by layer, the way the authors'
released code is structured: for every student layer two full ``fft2`` calls (the student's and,
again, the teacher's), ``fftshift``, explicit masks, ``F.normalize`` and ``torch.quantile``. It
shares no code with the vectorised implementation (:mod:`framer_dist.framer.objective`), which
must match it to 1e-5. The random layers ``j`` are passed in explicitly so both can be compared on
one draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from framer_dist.config import FramerConfig


def _fp(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()  # fp32 at least


def _shifted_spectrum(x: Tensor) -> Tensor:
    return torch.fft.fftshift(torch.fft.fft2(_fp(x)), dim=(-2, -1))


def _radial_lf(h: int, w: int, radius: float, device: torch.device) -> Tensor:
    # fftshift-ed normalised frequencies in [-1, 1): (k - n//2) * 2 / n, 1 = Nyquist
    fy = (torch.arange(h, dtype=torch.float64) - h // 2) * 2.0 / h
    fx = (torch.arange(w, dtype=torch.float64) - w // 2) * 2.0 / w
    rho = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return (rho <= radius).to(device)


def _masks(s_teacher: Tensor, cfg: FramerConfig) -> tuple[Tensor, Tensor]:
    b, c, h, w = s_teacher.shape
    if cfg.mask == "radial":
        m_lf = _radial_lf(h, w, cfg.radius, s_teacher.device).expand(b, c, h, w)
    else:
        mag = s_teacher.abs()
        q = torch.quantile(mag.reshape(b, -1), cfg.cutoff, dim=1)
        m_lf = mag < q.view(b, 1, 1, 1)
    m_lf = m_lf.to(s_teacher.real.dtype)
    return m_lf, 1.0 - m_lf


def _band(s: Tensor, m: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    b = s.shape[0]
    mag = s.abs() * m
    z = F.normalize(mag.reshape(b, -1), dim=1)
    energy = (mag.sum(dim=(-2, -1)) / (m.sum(dim=(-2, -1)) + eps)).mean(dim=1)
    return z, energy


def _faw(e_s: Tensor, e_t: Tensor, cfg: FramerConfig) -> Tensor:
    gap = (e_t - e_s).abs()
    if cfg.faw_denominator == "student":
        delta = gap / (e_s + cfg.eps)
    elif cfg.faw_denominator == "teacher":
        delta = gap / (e_t + cfg.eps)
    else:
        delta = gap
    return 1.0 / (1.0 + delta)


def reference_framer_loss(students: Tensor, teacher: Tensor, cfg: FramerConfig,
                          neg_layers: list[int] | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss ``agg_i L^(i)`` and per-layer metrics for one process holding the whole batch."""
    n_layers, b = students.shape[:2]
    teacher = teacher.detach()
    tau = cfg.tau
    # pass 1: per layer, two FFTs (student i and the teacher), masks, band vectors, energies
    z = {"lf": [], "hf": []}
    e = {"lf": [], "hf": []}
    zt, et = {}, {}
    for i in range(n_layers):
        s_i = _shifted_spectrum(students[i])
        s_t = _shifted_spectrum(teacher)
        m = dict(zip(("lf", "hf"), _masks(s_t, cfg)))
        for band in ("lf", "hf"):
            zi, ei = _band(s_i, m[band], cfg.eps)
            zt[band], et[band] = _band(s_t, m[band], cfg.eps)
            z[band].append(zi)
            e[band].append(ei)
    # pass 2: losses per layer
    kinds = {"lf": cfg.lf_loss, "hf": cfg.hf_loss}
    layer_losses, metrics = [], {k: [] for k in ("w_lf", "w_hf", "a_lf", "a_hf", "cos_lf", "cos_hf",
                                                  "l_lf", "l_hf")}
    for i in range(n_layers):
        total_i = 0.0
        for band in ("lf", "hf"):
            q, k = z[band][i], zt[band]
            kj = z[band][neg_layers[i]].detach() if neg_layers is not None else None
            if kinds[band] == "inter" and cfg.in_batch_negatives:
                keys = k if kj is None else torch.cat([k, kj], dim=0)  # [B or 2B, K]
                logits = q @ keys.t() / tau
                loss = F.cross_entropy(logits, torch.arange(b, device=q.device), reduction="none")
            else:
                cols = [(q * k).sum(1) / tau]
                if kj is not None:
                    cols.append((q * kj).sum(1) / tau)
                logits = torch.stack(cols, dim=1)
                loss = -torch.log_softmax(logits, dim=1)[:, 0]
            cos = (q * k).sum(1).detach()
            w = _faw(e[band][i], et[band], cfg).detach() if cfg.faw else torch.ones_like(cos)
            a = torch.relu(cos) if cfg.fam else torch.ones_like(cos)
            total_i = total_i + (w * a * loss).mean()
            metrics[f"w_{band}"].append(w.mean())
            metrics[f"a_{band}"].append(a.mean())
            metrics[f"cos_{band}"].append(cos.mean())
            metrics[f"l_{band}"].append(loss.detach().mean())
        if cfg.plain_l2:
            total_i = ((_fp(students[i]) - _fp(teacher)) ** 2).mean()
        layer_losses.append(total_i)
    stacked = torch.stack(layer_losses)
    loss = stacked.mean() if cfg.layer_reduce == "mean" else stacked.sum()
    out = {k: torch.stack(v) for k, v in metrics.items()}
    out["loss_layer"] = stacked.detach()
    return loss, out
