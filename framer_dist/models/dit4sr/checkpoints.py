"""The DiT4SR family's exports as inference reads them (``InferenceSpec.detect`` / ``load``).

Kinds (``--kind auto`` recognises them by their files):

- ``full``: a diffusers-layout transformer folder (``config.json`` + safetensors, or a pipeline
  root with ``transformer/``), as written by ``save_model``.
- ``control``: ``dit4sr_control.safetensors`` (the DiT4SR layers only) on top of ``--base``, the
  stock SD3/SD3.5 folder it was trained from.
- ``lora``: ``pytorch_lora_weights.safetensors`` on top of ``--base``; a control file in the same
  folder or the one above (LoRA mode trains the control layers too) is loaded as well.

A folder holding several exports (e.g. the trainer's ``export/`` with ``transformer/`` and
``dit4sr_control.safetensors``) resolves to the full one first.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from framer_dist.models import ModelLoadError

# diffusers and peft load only when a checkpoint is read (the family registers these at import)

KINDS = ("full", "control", "lora")


def _full(p: Path) -> Path | None:
    """The transformer folder of ``p`` (itself, or a pipeline root's transformer/), or None."""
    return next((d for d in (p, p / "transformer") if (d / "config.json").is_file()), None)


def detect_kind(path: str | Path, skip: tuple[str, ...] = ()) -> tuple[str, Path]:
    """(kind, the file or folder to load) for an existing checkpoint file or folder; raises naming
    what was looked for. ``skip``: names of sub-folders not to look in."""
    from .training import CONTROL_FILE, LORA_FILE

    p = Path(path).expanduser()
    if p.is_file():
        if p.name.endswith(".safetensors"):
            return ("lora" if "lora" in p.name else "control"), p
        raise ModelLoadError(f"checkpoint {p} is a file but not .safetensors")
    candidates = [p] + sorted(d for d in p.iterdir() if d.is_dir() and d.name not in skip)
    for c in candidates:
        if (full := _full(c)) is not None:
            return "full", full
    for c in candidates:
        if (c / LORA_FILE).is_file():
            return "lora", c / LORA_FILE
    for c in candidates:
        if (c / CONTROL_FILE).is_file():
            return "control", c / CONTROL_FILE
    raise ModelLoadError(f"{p} holds no checkpoint: looked for config.json (full transformer), "
                         f"{LORA_FILE} (LoRA) or {CONTROL_FILE} (control layers) in it and its "
                         "sub-folders")


def load_checkpoint(kind: str, path: Path, base: Path | None) -> nn.Module:
    """The DiT4SR transformer of a ``kind`` checkpoint at ``path`` (from ``detect_kind``); control
    and LoRA checkpoints go on top of ``base``."""
    from .loading import PretrainedLoadError, load_pretrained
    from .training import CONTROL_FILE, load_control, load_lora

    if kind != "full":
        if not base:
            raise ModelLoadError(f"{path} is a {kind} checkpoint: it needs --base, the "
                                 "pretrained SD3/SD3.5 folder (or full checkpoint) it was trained on")
        if not Path(base).exists():
            raise ModelLoadError(f"--base folder not found: {base}")
    try:
        if kind == "full":
            return load_pretrained(path)
        model = load_pretrained(base)
        if kind == "control":
            control = path
        else:  # next to the adapter, or one up: the trainer writes export/dit4sr_control.safetensors
            # and export/lora/pytorch_lora_weights.safetensors
            control = next((d / CONTROL_FILE for d in (path.parent, path.parent.parent)
                            if (d / CONTROL_FILE).is_file()), None)
        if control is not None:
            load_control(model, control)
        if kind == "lora":
            load_lora(model, path)
        return model
    except PretrainedLoadError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise ModelLoadError(f"cannot load {kind} checkpoint {path}: {e}") from None
