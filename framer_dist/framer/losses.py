"""IntraCL / InterCL as softmax cross-entropies over cosine similarities (docs/specs/framer.md
section 3).

Queries are the un-normalised band vectors of the student layers (gradients flow through them and
their norms); all keys are unit vectors and detached. Logits are ``(q . k) / (|q| tau)``, i.e.
``s(z_q, k)`` with ``z_q = q / |q|``, without materialising ``z_q``.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-12  # as torch.nn.functional.normalize: a zero vector stays zero


def unit(vec: Tensor, norm: Tensor) -> Tensor:
    """Detached unit vectors ``vec / max(norm, 1e-12)`` along the last axis."""
    return (vec / norm.clamp_min(NORM_EPS).unsqueeze(-1)).detach()


def local_contrastive(q: Tensor, qnorm: Tensor, teacher_key: Tensor, neg_vec: Tensor | None,
                      neg_norm: Tensor | None, tau: float) -> tuple[Tensor, Tensor]:
    """Per-image contrast: keys are the image's own teacher vector (positive) and, if given, its own
    random-layer vector. This is IntraCL, and InterCL without in-batch negatives.

    q: ``[L, B, K]``, qnorm: ``[L, B]``, teacher_key: ``[B, K]`` unit; neg_vec ``[L, B, K]`` and
    neg_norm ``[L, B]``: the random layers' (un-normalised, detached) vectors and norms.
    With no negative the softmax has one entry and the loss is exactly 0 (no gradient).
    Returns (loss ``[L, B]``, cosine to the teacher ``[L, B]``).
    """
    qn = qnorm.clamp_min(NORM_EPS)
    # batched row dot products as [.., 1, K] @ [.., K, 1] matmuls: no [L, B, K] product temporary
    pos = torch.matmul(q.unsqueeze(-2), teacher_key.unsqueeze(-1)).view(qn.shape) / qn
    cols = [pos]
    if neg_vec is not None:
        dot = torch.matmul(q.unsqueeze(-2), neg_vec.detach().unsqueeze(-1)).view(qn.shape)
        cols.append(dot / (qn * neg_norm.detach().clamp_min(NORM_EPS)))
    logits = torch.stack(cols, dim=-1) / tau
    return torch.logsumexp(logits, dim=-1) - logits[..., 0], pos


def global_contrastive(q: Tensor, qnorm: Tensor, teacher_keys: Tensor, neg_vec: Tensor | None,
                       neg_norm: Tensor | None, labels: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """InfoNCE over the global batch (InterCL): keys are every image's teacher vector, then every
    image's random-layer vector (layer ``j(i)`` for query layer ``i``); the label is the image's own
    teacher key.

    q: ``[L, B, K]``; teacher_keys: ``[Bg, K]`` unit; neg_vec ``[L, Bg, K]`` (detached, any scale)
    with norms neg_norm ``[L, Bg]``, or None; labels: ``[B]`` global indices (``rank * B + b``).
    Returns (loss ``[L, B]``, cosine to the teacher ``[L, B]``).
    """
    n_layers, b = q.shape[:2]
    qn = qnorm.clamp_min(NORM_EPS).unsqueeze(-1)
    sims = [torch.matmul(q, teacher_keys.t())]  # [L, B, Bg]
    if neg_vec is not None:
        dots = torch.bmm(q, neg_vec.detach().transpose(1, 2))  # [L, B, Bg]
        sims.append(dots / neg_norm.detach().clamp_min(NORM_EPS).unsqueeze(1))
    cos = torch.cat(sims, dim=-1) / qn
    idx = labels.view(1, b, 1).expand(n_layers, b, 1)
    pos = cos.gather(-1, idx).squeeze(-1)
    logits = cos / tau
    return torch.logsumexp(logits, dim=-1) - pos / tau, pos
