"""The pisasr family with a step that also reports how often the U-Net's FRAMER readout ran
(tests/test_pisasr_train.py): after every micro-batch it writes the calls so far and the model's
``ReadoutStats`` to ``<train.out_dir>/readouts_rank<R>.json``. Launched as
``model.family="_pisasr_counting:FAMILY"`` (tests/ on PYTHONPATH), so every backend's worker
imports it the same way; its config section stays ``[pisasr]``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from framer_dist.models.pisasr.family import FAMILY as PISASR

_CALLS = {"n": 0}


def _step(model, batch, ctx):
    out = PISASR.step(model, batch, ctx)
    _CALLS["n"] += 1
    unet = getattr(model, "module", model)  # the DeepSpeed engine wraps it; FSDP2 does not
    stats = unet.readout_stats
    rec = {"calls": _CALLS["n"], "forward": stats.forward, "recomputed": stats.recomputed,
           "heads": len(unet.framer_heads), "checkpointed": sorted(unet.activation_checkpointing)}
    out_dir = Path(ctx.cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"readouts_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(rec))
    return out


FAMILY = dataclasses.replace(PISASR, step=_step)
