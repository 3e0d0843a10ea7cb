"""The end-of-run exports (``checkpoint.export``): gathered by the backend, written by the
model family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from framer_dist.config import Config


def export(family: Any, cfg: Config, backend: Any, out_dir: Path) -> dict[str, Path]:
    """The end-of-run exports named in checkpoint.export (collective; rank 0 writes).

    The backend gathers every tensor (unsharded, fp32 masters for the trained ones) to rank 0,
    where the family writes them under ``<out_dir>/export`` (DiT4SR: ``dit4sr/family.py``). With
    ``train.ema`` the same exports are also written from the EMA weights under ``export/ema/``.
    """
    kinds = list(dict.fromkeys(cfg.checkpoint.export))
    if not kinds:
        return {}
    full = backend.full_state_dict()  # collective
    ema = backend.ema_state_dict() if cfg.train.ema else {}  # collective; trained params only
    out: dict[str, Path] = {}
    if backend.is_main:
        out.update(family.export(cfg, kinds, full, out_dir / "export"))
        if ema:
            ema_out = family.export(cfg, kinds, {**full, **ema}, out_dir / "export" / "ema")
            out.update({f"ema_{k}": v for k, v in ema_out.items()})
    backend.barrier()
    return out
