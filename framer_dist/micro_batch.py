"""The loss of one micro-batch: the model family's own loss + lambda * FRAMER.

The family runs its model once (its base loss and the per-block features, ``StepOutput``); the
FRAMER objective (``framer_dist.framer``) sees only the features. Shared by the trainer
(``train.py``) and the step benchmark (``bench/train_step.py``), so the benchmark times exactly
what training runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from framer_dist.framer import framer_objective
from framer_dist.models import ModelFamily, StepContext


@dataclass
class MicroBatchLoss:
    total: Tensor                     # what backward runs on
    base: Tensor                      # the family's own loss (DiT4SR: the rectified-flow noise loss)
    framer: Tensor                    # agg_i L^(i) before lambda (zero when FRAMER is off)
    layer_metrics: dict[str, Tensor] = field(default_factory=dict)
    verify: Callable[[], None] = lambda: None  # deferred FRAMER NaN/Inf check; call before stepping
    parts: dict[str, Tensor] = field(default_factory=dict)  # the base loss's terms (detached)


def micro_batch_loss(family: ModelFamily, model: Callable, batch: dict[str, Any],
                     ctx: StepContext, students: list[int], teacher: int,
                     generator: torch.Generator, gather: Callable[[Tensor], Tensor] | None = None,
                     rank: int = 0) -> MicroBatchLoss:
    """Run the family's step and add lambda * FRAMER over ``students`` against ``teacher`` (a
    layer index, unless the family returns its own teacher).

    The FRAMER NaN/Inf check is deferred where it can be (see ``framer_objective``): call
    ``.verify()`` after backward and before the optimizer step."""
    f_cfg = ctx.cfg.framer
    out = family.step(model, batch, ctx)
    if not f_cfg.enabled or out.features is None:
        return MicroBatchLoss(out.loss, out.loss, torch.zeros((), device=out.loss.device),
                              parts=out.parts)
    feats = out.features
    key = out.teacher if out.teacher is not None else feats[teacher]
    hf = out.hf_layers[students] if out.hf_layers is not None else None
    res = framer_objective(feats[students], key, f_cfg, generator,
                           gather=gather, rank=rank, defer_check=True, hf_layers=hf)
    return MicroBatchLoss(out.loss + f_cfg.weight * res.loss, out.loss, res.loss, res.metrics,
                          res.verify, out.parts)
