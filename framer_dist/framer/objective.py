"""The FRAMER objective (docs/specs/framer.md sections 2-5), vectorised over student layers.

One FFT call transforms every student layer and the teacher together (fp32, ``rfft2`` half by
default); masks, FAW energies, band vectors and both contrastive losses are batched tensor ops over
the layer axis. There is no Python loop over layers.

Data parallelism: the InterCL keys of the whole global batch are needed, and they are detached, so a
plain ``all_gather`` (the injected ``gather``) is exact. Before the key gather, every rank first
gathers a fixed-size ``[1, 4]`` row (local batch, number of layers, first non-finite layer,
checksum of the random-layer draw), which lets every rank refuse unequal local batches or
out-of-sync generators with a clear message, and agree on the NaN/Inf decision (so no rank is left
waiting in a collective). Unequal last batches are refused, not padded: drop them
(``data.drop_last = true``).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from framer_dist.config import FramerConfig
from framer_dist.framer.layers import draw_negative_layers
from framer_dist.framer.losses import global_contrastive, local_contrastive, unit
from framer_dist.framer.modulation import faw_weight, fam_gate
from framer_dist.framer.spectra import BandFeatures, band_features, spectrum_magnitude

Gather = Callable[[Tensor], Tensor]

METRIC_KEYS = ("w_lf", "w_hf", "a_lf", "a_hf", "l_intra", "l_inter", "cos_lf", "cos_hf",
               "l_lf", "l_hf", "loss_layer", "nonfinite", "skipped")


@dataclass
class FramerResult:
    """``loss``: scalar ``agg_i L^(i)`` in fp32, *before* ``framer.weight`` (lambda).

    ``metrics``: detached per-layer ``[L]`` tensors (batch means): ``w_lf, w_hf`` (FAW, 1 when
    off), ``a_lf, a_hf`` (FAM, 1 when off), ``cos_lf, cos_hf`` (teacher cosine per band, before
    the ReLU), ``l_lf, l_hf`` (raw contrastive loss of each band), ``l_intra, l_inter`` (raw loss of
    the band(s) using that loss, averaged over them; 0 when no band uses it), ``loss_layer``
    (``L^(i)``), ``nonfinite`` (1 where this rank's student layer had NaN/Inf; all ones if the
    teacher had) and ``skipped`` (all ones when the step's FRAMER term was skipped).
    ``negative_layers``: the drawn ``j`` per student position (CPU int64 ``[L]``; -1 when off).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    negative_layers: Tensor | None = None
    # ``defer_check=True``: per-feature finiteness [L+1] still on the device, checked by verify()
    pending_finite: Tensor | None = None

    def verify(self) -> None:
        """Raise the deferred ``framer.nonfinite = 'error'`` check (a host sync); no-op otherwise."""
        if self.pending_finite is None:
            return
        finite = self.pending_finite.cpu()
        self.pending_finite = None
        if not bool(finite.all()):
            n_layers = finite.numel() - 1
            raise FloatingPointError(_nonfinite_message(0, int((~finite).nonzero()[0]), n_layers, False))


def _check_inputs(students: Tensor, teacher: Tensor, cfg: FramerConfig, generator: torch.Generator | None,
                  rank: int) -> None:
    if not isinstance(students, Tensor) or students.dim() != 5:
        raise ValueError("framer_objective: students must be a [L, B, C, H, W] tensor, got shape "
                         f"{tuple(students.shape) if isinstance(students, Tensor) else type(students).__name__}")
    if not isinstance(teacher, Tensor) or teacher.dim() != 4:
        raise ValueError("framer_objective: teacher must be a 4-D [B, C, H, W] tensor, got shape "
                         f"{tuple(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__}")
    if tuple(students.shape[1:]) != tuple(teacher.shape):
        raise ValueError(f"framer_objective: student features {tuple(students.shape)} ([L, B, C, H, W]) and "
                         f"teacher features {tuple(teacher.shape)} ([B, C, H, W]) disagree in [B, C, H, W]")
    if not (students.is_floating_point() and teacher.is_floating_point()):
        raise ValueError(f"framer_objective: features must be floating point, got students {students.dtype}, "
                         f"teacher {teacher.dtype}")
    if students.device != teacher.device:
        raise ValueError(f"framer_objective: students on {students.device} but teacher on {teacher.device}")
    n_layers, b = students.shape[:2]
    if n_layers < 1 or b < 1 or students.numel() == 0:
        raise ValueError(f"framer_objective: empty student features {tuple(students.shape)}")
    if cfg.random_negatives and n_layers < 2:
        raise ValueError(f"framer_objective: framer.random_negatives = true needs at least two student "
                         f"layers, got {n_layers} (students shape {tuple(students.shape)})")
    if cfg.random_negatives and not isinstance(generator, torch.Generator):
        raise ValueError("framer_objective: framer.random_negatives = true needs a torch.Generator "
                         f"for the random-layer draw, got {type(generator).__name__}")
    if rank < 0:
        raise ValueError(f"framer_objective: rank must be >= 0, got {rank}")


class _Group:
    """The data-parallel view the objective needs: world size, agreement, key gather."""

    def __init__(self, gather: Gather | None, rank: int, b_local: int, n_layers: int, bad: int,
                 neg: Tensor | None, device: torch.device) -> None:
        self.gather = gather
        self.rank = rank
        if gather is None:
            if rank != 0:
                raise ValueError(f"framer_objective: rank={rank} but no gather function was given "
                                 "(pass the data-parallel gather, or rank=0 when not distributed)")
            self.world, self.bad = 1, [(0, bad)] if bad >= 0 else []
            return
        checksum = 0.0
        if neg is not None:
            checksum = float(((neg + 1) * torch.arange(1, n_layers + 1)).sum())
        meta = torch.tensor([[b_local, n_layers, bad, checksum]], dtype=torch.float32, device=device)
        rows = gather(meta)
        if rows.dim() != 2 or rows.shape[1] != 4:
            raise ValueError(f"framer_objective: the gather function returned shape {tuple(rows.shape)} for "
                             "a [1, 4] input; it must all_gather along dim 0 in rank order")
        rows = rows.cpu()
        self.world = rows.shape[0]
        if rank >= self.world:
            raise ValueError(f"framer_objective: rank={rank} but the gather returned {self.world} ranks")
        sizes = rows[:, 0].long().tolist()
        if len(set(sizes)) != 1:
            raise ValueError(f"framer_objective: unequal local batch sizes across data-parallel ranks {sizes}; "
                             "the InterCL key gather needs equal shapes: drop the uneven last batch "
                             "(data.drop_last = true)")
        layers = rows[:, 1].long().tolist()
        if len(set(layers)) != 1:
            raise ValueError(f"framer_objective: ranks disagree on the number of student layers {layers}")
        if len(set(rows[:, 3].tolist())) != 1:
            raise ValueError("framer_objective: the random-layer draw differs across ranks; the framer "
                             "generator must be seeded (and restored) identically on every rank")
        self.bad = [(r, int(v)) for r, v in enumerate(rows[:, 2].tolist()) if v >= 0]

    def all_gather(self, payload: Tensor) -> Tensor:
        if self.gather is None:
            return payload
        out = self.gather(payload.contiguous())
        expect = (self.world * payload.shape[0], payload.shape[1])
        if tuple(out.shape) != expect:
            raise ValueError(f"framer_objective: the gather function returned {tuple(out.shape)}, expected "
                             f"{expect} ([world * B_local, K] in rank order)")
        return out


def _nonfinite_message(rank: int, layer: int, n_layers: int, distributed: bool) -> str:
    where = "the teacher" if layer == n_layers else f"student layer {layer} (position in the stacked students tensor)"
    on = f" on rank {rank}" if distributed else ""
    return (f"framer_objective: non-finite values (NaN/Inf, or fp32 overflow in the FFT) in the features of "
            f"{where}{on}; set framer.nonfinite = 'skip' to skip the FRAMER term on such steps")


def _band_loss(band: BandFeatures, kind: str, n_layers: int, neg: Tensor | None, cfg: FramerConfig,
               group: _Group, gathered: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
    q, qnorm = band.vec[:n_layers], band.norm[:n_layers]
    teacher_key = unit(band.vec[n_layers], band.norm[n_layers])
    if kind == "inter" and cfg.in_batch_negatives:
        b = q.shape[1]
        labels = torch.arange(b, device=q.device) + group.rank * b
        if group.gather is None:
            keys_t = teacher_key
            vec_j = band.vec.detach().index_select(0, neg) if neg is not None else None
            norm_j = band.norm.detach().index_select(0, neg) if neg is not None else None
        else:  # gathered keys are unit vectors already
            keys_t, vec_j = gathered[name + "_t"], gathered.get(name + "_j")
            norm_j = torch.ones(vec_j.shape[:2], dtype=vec_j.dtype, device=vec_j.device) if vec_j is not None else None
        return global_contrastive(q, qnorm, keys_t, vec_j, norm_j, labels, cfg.tau)
    vec_j = band.vec.detach().index_select(0, neg) if neg is not None else None
    norm_j = band.norm.detach().index_select(0, neg) if neg is not None else None
    return local_contrastive(q, qnorm, teacher_key, vec_j, norm_j, cfg.tau)


def _gather_keys(bands: dict[str, BandFeatures], kinds: dict[str, str], n_layers: int, neg: Tensor | None,
                 group: _Group) -> dict[str, Tensor]:
    """One all_gather of every global band's unit keys: own teacher, then the drawn layers."""
    names = [n for n in ("lf", "hf") if kinds[n] == "inter"]
    if group.gather is None or not names:
        return {}
    uniq, pos = (torch.unique(neg, return_inverse=True) if neg is not None else (None, None))
    parts, sizes = [], []
    for n in names:
        band = bands[n]
        b, k = band.vec.shape[1:]
        keys = [unit(band.vec[n_layers], band.norm[n_layers]).unsqueeze(1)]  # [B, 1, K]
        if uniq is not None:
            keys.append(unit(band.vec[uniq], band.norm[uniq]).transpose(0, 1))  # [B, U, K]
        block = torch.cat(keys, dim=1)
        sizes.append(block.shape[1:])
        parts.append(block.reshape(b, -1))
    out = group.all_gather(torch.cat(parts, dim=1))  # [Bg, sum]
    result, start = {}, 0
    for n, (m, k) in zip(names, sizes):
        # explicit batch size: an empty band (radius >= sqrt(2)) has k = 0, where -1 is ambiguous
        block = out[:, start:start + m * k].reshape(out.shape[0], m, k)
        start += m * k
        result[n + "_t"] = block[:, 0]
        if pos is not None:
            result[n + "_j"] = block[:, 1:].index_select(1, pos.to(out.device)).transpose(0, 1)  # [L, Bg, K]
    return result


def framer_objective(students: Tensor, teacher: Tensor, cfg: FramerConfig,
                     generator: torch.Generator | None, gather: Gather | None = None,
                     rank: int = 0, defer_check: bool = False,
                     hf_layers: Tensor | None = None) -> FramerResult:
    """The FRAMER term ``agg_i L^(i)`` (before ``framer.weight``) and its per-layer metrics.

    students: ``[L, B, C, H, W]`` features of the student layers (any float dtype, graph attached);
    teacher: ``[B, C, H, W]`` (detached here); generator: CPU generator for the random-layer draw
    (one ``j != i`` per student position per call, shared by the batch; must be in the same state on
    every rank); gather: ``[B_local, K] -> [world * B_local, K]`` all_gather in rank order (None =
    single process); rank: this process's index in the data-parallel group (label index of image
    ``b`` is ``rank * B_local + b``). See docs/specs/framer.md and docs/framer.md for every switch.

    Autocast is switched off inside: the spectra, norms and logits stay fp32 even when the trainer
    calls this within its bf16 autocast region.

    ``defer_check=True`` (single process, ``nonfinite='error'``): the NaN/Inf check stays on the
    device and :meth:`FramerResult.verify` raises it later (call it before the optimizer step).
    This removes the one host sync in the middle of the step, so the host keeps queuing work
    while the GPU runs the forward. With a gather, or with ``'skip'``, the check is immediate.

    ``hf_layers``: bool ``[L]``, which students' HF terms count (None = all). A family whose
    students live on coarser grids than the teacher's (FRAMER_U) drops the HF term of a student
    that holds nothing above the LF radius; its LF term and its role as a negative stay.
    """
    _check_inputs(students, teacher, cfg, generator, rank)
    if hf_layers is not None and tuple(hf_layers.shape) != (students.shape[0],):
        raise ValueError(f"framer_objective: hf_layers must be [L={students.shape[0]}], got "
                         f"{tuple(hf_layers.shape)}")
    with torch.autocast(device_type=students.device.type, enabled=False):
        return _objective(students, teacher, cfg, generator, gather, rank, defer_check, hf_layers)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without stalling the host: a pageable copy waits for the stream to drain."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _objective(students: Tensor, teacher: Tensor, cfg: FramerConfig, generator: torch.Generator | None,
               gather: Gather | None, rank: int, defer_check: bool = False,
               hf_layers: Tensor | None = None) -> FramerResult:
    n_layers, b, _, _, w = students.shape
    neg = draw_negative_layers(n_layers, generator) if cfg.random_negatives else None
    neg_dev = _to_device(neg, students.device) if neg is not None else None
    kinds = {"lf": cfg.lf_loss, "hf": cfg.hf_loss}
    if not cfg.random_negatives and "intra" in kinds.values():
        warnings.warn("framer: random_negatives = false leaves IntraCL a one-key softmax: its loss is "
                      "exactly 0 (documented in docs/framer.md)", stacklevel=2)
    uses_global = cfg.in_batch_negatives and "inter" in kinds.values()

    # plain_l2: the spectral part only feeds metrics; otherwise keep the caller's grad mode
    grad_ctx = torch.no_grad() if cfg.plain_l2 else contextlib.nullcontext()
    with grad_ctx:
        mag = spectrum_magnitude(students, teacher, half=cfg.use_rfft)  # [L+1, B, C, H, Wk]
        lf, hf = band_features(mag, cfg.mask, cfg.radius, cfg.cutoff, cfg.eps, cfg.use_rfft, w)
        del mag
    bands = {"lf": lf, "hf": hf}

    # NaN/Inf anywhere in a layer's features spreads to all its bins, so the band norms (already
    # computed) tell which layer is bad at no extra cost.
    with torch.no_grad():
        finite_dev = torch.isfinite(lf.norm + hf.norm).all(dim=1)  # [L+1]
    defer = defer_check and cfg.nonfinite == "error" and not (uses_global and gather is not None)
    if defer:
        bad_local = -1  # verified later, by FramerResult.verify()
    else:
        finite = finite_dev.cpu()
        bad_local = int((~finite).nonzero()[0]) if not bool(finite.all()) else -1
    group = _Group(gather if uses_global else None, rank if uses_global else 0, b, n_layers, bad_local,
                   neg, students.device)
    if group.bad:
        r, layer = group.bad[0]
        if cfg.nonfinite == "error":
            raise FloatingPointError(_nonfinite_message(r, layer, n_layers, group.world > 1))
        return _skipped_result(n_layers, finite, neg, students.device)
    if uses_global and group.world * b < 2:
        raise ValueError("framer_objective: framer.in_batch_negatives = true needs a global batch of at "
                         f"least 2 images, got {group.world * b} (local batch {b}, {group.world} rank(s)); "
                         "use a larger batch or set framer.in_batch_negatives = false")

    gathered = _gather_keys(bands, kinds, n_layers, neg_dev, group) if uses_global else {}
    with grad_ctx:
        per_band = {}
        for name in ("lf", "hf"):
            band = bands[name]
            loss, cos = _band_loss(band, kinds[name], n_layers, neg_dev, cfg, group, gathered, name)
            wgt = (faw_weight(band.energy[:n_layers], band.energy[n_layers], cfg.faw_denominator, cfg.eps)
                   if cfg.faw else torch.ones_like(cos))
            gate = fam_gate(cos) if cfg.fam else torch.ones_like(cos)
            if name == "hf" and hf_layers is not None:  # coarse students: no HF term
                gate = gate * hf_layers.to(gate.device, gate.dtype).unsqueeze(1)
            per_band[name] = (loss, cos.detach(), wgt.detach(), gate.detach())
        layer_loss = sum((p[2] * p[3] * p[0]).mean(dim=1) for p in per_band.values())  # [L]
    if cfg.plain_l2:
        dtype = torch.float64 if students.dtype == torch.float64 else torch.float32
        diff = students.to(dtype) - teacher.detach().to(dtype).unsqueeze(0)
        layer_loss_used = diff.pow(2).mean(dim=(1, 2, 3, 4))
    else:
        layer_loss_used = layer_loss
    total = layer_loss_used.mean() if cfg.layer_reduce == "mean" else layer_loss_used.sum()

    metrics = {}
    for name, (loss, cos, wgt, gate) in per_band.items():
        metrics[f"w_{name}"] = wgt.mean(1)
        metrics[f"a_{name}"] = gate.mean(1)
        metrics[f"cos_{name}"] = cos.mean(1)
        metrics[f"l_{name}"] = loss.detach().mean(1)
    for kind in ("intra", "inter"):
        sel = [metrics[f"l_{n}"] for n in ("lf", "hf") if kinds[n] == kind]
        metrics[f"l_{kind}"] = torch.stack(sel).mean(0) if sel else torch.zeros_like(metrics["l_lf"])
    metrics["loss_layer"] = layer_loss_used.detach()
    metrics["nonfinite"] = _nonfinite_flags(finite_dev, n_layers)
    metrics["skipped"] = torch.zeros(n_layers, device=students.device)
    return FramerResult(total, metrics, neg if neg is not None else torch.full((n_layers,), -1),
                        pending_finite=finite_dev if defer else None)


def _nonfinite_flags(finite: Tensor, n_layers: int) -> Tensor:
    """``[L]`` float from per-feature finiteness ``[L+1]`` (students, then the teacher): 1 where a
    student layer is non-finite, all ones when the teacher is. No host read."""
    return ((~finite[:n_layers]) | ~finite[n_layers]).float()


def _skipped_result(n_layers: int, finite: Tensor, neg: Tensor | None, device: torch.device) -> FramerResult:
    """``framer.nonfinite = 'skip'``: a zero loss (no graph) and every metric zero except the flags."""
    metrics = {k: torch.zeros(n_layers, device=device) for k in METRIC_KEYS}
    metrics["nonfinite"] = _nonfinite_flags(finite, n_layers).to(device)
    metrics["skipped"] = torch.ones(n_layers, device=device)
    return FramerResult(torch.zeros((), device=device), metrics,
                        neg if neg is not None else torch.full((n_layers,), -1))
