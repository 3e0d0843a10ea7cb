"""The end-of-run exports (``checkpoint.export``): gathered by the backend, written by the
model family, with the family recorded beside them (``family.json``) for framer-sr and the
analysis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from framer_dist.atomic import write_text_atomic
from framer_dist.config import Config

FAMILY_FILE = "family.json"  # {"family": model.family} in <out_dir>/export


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
        (out_dir / "export").mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "export" / FAMILY_FILE,
                          json.dumps({"family": cfg.model.family}) + "\n")
    backend.barrier()
    return out


def _latest(root: Path) -> str:
    """The step folder a checkpoint root's ``latest`` names ('' when there is none)."""
    from framer_dist.checkpoint import LATEST

    f = root / LATEST
    return f.read_text().strip() if f.is_file() else ""


def read_family(path: str | Path) -> str | None:
    """The family recorded for an export at ``path`` (a file or folder in a trainer's ``export/``:
    ``family.json`` in it or up to three folders above) or for a trainer checkpoint (its
    ``backend_meta.json``; written before families: the default family), or None (exports written before families
    were recorded, or copied out of ``export/``: the caller takes the default family)."""
    p = Path(path).expanduser().resolve()
    from framer_dist.models import DEFAULT_FAMILY
    from framer_dist.parallel.base import META_FILE
    for d in (p, p / _latest(p)) if p.is_dir() else ():  # a trainer checkpoint records it too
        if (d / META_FILE).is_file():
            try:
                return json.loads((d / META_FILE).read_text()).get("family", DEFAULT_FAMILY)
            except (OSError, ValueError, AttributeError) as e:
                raise ValueError(f"{d / META_FILE}: not readable ({e!r})") from None
    for d in ([p] if p.is_dir() else []) + list(p.parents)[:3]:
        f = d / FAMILY_FILE
        if f.is_file():
            try:
                name = json.loads(f.read_text())["family"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{f}: not a family record ({e!r})") from None
            if not isinstance(name, str):
                raise ValueError(f"{f}: 'family' is not a string: {name!r}")
            return name
    return None
