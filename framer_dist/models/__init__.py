"""Model families: the backbones FRAMER plugs into, behind one small protocol.

A family is a :class:`ModelFamily` registered by name (``model.family``); ``dit4sr`` (the
LR-conditioned SD3/SD3.5 MMDiT, ``models/dit4sr/``) is the default. ``model.family`` may also be a
``module:attribute`` import string naming a ModelFamily defined outside the package (every
torchrun / DeepSpeed / SLURM worker imports it the same way). The trainer, the backends and the
FRAMER objective only meet a family through this protocol; so do the data tools (its latent codec,
``latents.py``, and text encoder), framer-sr and the layer-hierarchy analysis (its
``InferenceSpec``, ``inference.py``). docs/interfaces.md, "Model families", says how to add one.

The module a family builds is what the backend wraps. Besides ``forward`` it exposes, for
``framer_dist.parallel`` (duck-typed, no import of the family):

* ``blocks`` or ``transformer_blocks``: the repeated blocks, in order - FSDP2's shard units,
  ZeRO-3's fetch units (their classes become DeepSpeed ``leaf_module`` classes),
  activation-checkpointing and compile units, and one FRAMER layer each (``num_blocks`` of them);
* ``set_activation_checkpointing(indices)``: recompute those blocks in backward, still
  returning each block's FRAMER feature exactly once;
* ``readout_head_modules`` (optional): names of submodules used after every block (the FRAMER
  readout), kept gathered under ZeRO-3 (``parallel.zero3_persist_head``) and unsharded through
  backward under FSDP2 (they belong to the root);
* ``no_weight_decay`` (optional): parameter-name prefixes the optimizer gives weight decay 0 (a
  second parameter group, on every backend).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from framer_dist.config import Config, ConfigError

from .inference import InferenceSpec, ModelShape, Prompt
from .latents import LatentCodec

# model.family's default, and the family of checkpoints and exports that record none (they were
# written when it was the only one)
DEFAULT_FAMILY = "dit4sr"


class ModelLoadError(ValueError):
    """Weights or a model folder that do not fit (one line naming the file or key)."""


@dataclass
class StepContext:
    """What a family's training step gets besides the model and the batch."""

    cfg: Config
    positions: list[int]   # global stream positions of the batch's samples: key every random draw
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    helpers: Any = None    # what the family's ``helpers`` built for this rank (frozen models)


@dataclass
class StepOutput:
    """A family's training step: its own (base) loss and, with FRAMER on, the per-block features
    ``[L, B, C, H, W]`` on one common grid (each block's exactly once). ``teacher``: the FRAMER
    teacher when it is not one of the L layers (e.g. the real output), else None (the trainer
    takes ``features[teacher_index]``). Features None with FRAMER on: no FRAMER term this step
    (a stage the family runs without it). ``hf_layers``: bool ``[L]`` over the feature layers,
    which ones get an HF term (None = all; see ``framer_objective``). ``parts``: detached terms
    of the base loss, logged as ``loss/<name>``; every rank returns the same names."""

    loss: Tensor
    features: Tensor | None = None
    teacher: Tensor | None = None
    hf_layers: Tensor | None = None
    parts: dict[str, Tensor] = field(default_factory=dict)


def _no_flops(model: nn.Module, cfg: Config) -> Callable[[dict[str, Any]], float] | None:
    return None


def _no_check(cfg: Config) -> None:
    return None


@dataclass(frozen=True)
class ModelFamily:
    """What a backbone provides to the trainer (the pattern: torchtitan's ``ModelSpec``)."""

    name: str
    presets: tuple[str, ...]            # allowed model.preset values
    modes: tuple[str, ...]              # allowed train.mode values
    build: Callable[[Config], nn.Module]                      # the module the backend wraps
    trainable: Callable[[nn.Module, Config], list[nn.Parameter]]  # sets requires_grad for train.mode
    step: Callable[[nn.Module, dict[str, Any], StepContext], StepOutput]
    base_loss_name: str = "base"        # logged as loss/<name>
    export_kinds: tuple[str, ...] = ()  # allowed checkpoint.export values
    # (cfg, kinds, full state dict, folder) -> written files; rank 0, after the backend gathered
    export: Callable[[Config, list[str], dict[str, Tensor], Path], dict[str, Path]] | None = None
    # called on the plain model before the backend wraps it: a per-batch training-FLOP count
    flops: Callable[[nn.Module, Config], Callable[[dict[str, Any]], float] | None] = _no_flops
    # (model, batch, cfg, autocast) -> an HWC uint8 picture for TensorBoard; every rank calls it
    validate: Callable[[nn.Module, dict[str, Any], Config, Any], Any] | None = None
    check: Callable[[Config], None] = _no_check  # up-front checks of the family's files/keys
    # (T5-style sequence width D, pooled width P) of the prompt embeddings the data pipeline feeds
    # (synthetic and null prompts, cache checks); T is data.prompt_len
    text_dims: Callable[[Config], tuple[int, int]] = lambda cfg: (0, 0)
    # the dataclass of the family's own config section, the TOML table named after the family
    # (cfg.family_section while the family is active; its keys are errors otherwise)
    config: type | None = None
    # (old key, new key) pairs for keys this family's section took over from an older format:
    # old TOML keys are refused naming the new place, old stored configs are migrated
    moved_keys: tuple[tuple[str, str], ...] = ()
    # its VAE latents: the data pipeline, prepare_data, framer-sr and the analysis encode with it
    latents: LatentCodec | None = None
    # (local model folder, device, dtype, tokens) -> an encoder: prompts -> Prompt, the widths of
    # text_dims. tokens: the length of its longest text stream (dit4sr: T5), None = its default.
    # tools/encode_prompts.py and framer-sr run it; ModelFolderError names what is missing
    text_encoder: Callable[[str | Path, str, torch.dtype, int | None],
                           Callable[[list[str]], Prompt]] | None = None
    inference: InferenceSpec | None = None  # framer-sr and the layer-hierarchy analysis
    # (model, cfg, device) -> what every step gets as ``StepContext.helpers``: frozen models (a
    # VAE, LPIPS, a frozen copy of the backbone) built once per rank, replicated, outside the
    # backend's engine. Called once the backend is set up: read the model's structure, not its
    # (possibly sharded) weights
    helpers: Callable[[nn.Module, Config, torch.device], Any] | None = None
    # the step takes pixel batches (``hr_raw`` crops or ``hr``/``lr``) and encodes them itself
    # (with its helpers' VAE); otherwise the trainer encodes them to ``hr_latent``/``lr_latent``
    takes_pixels: bool = False
    # the step swaps prompts for the empty one itself (data.null_prompt_prob, drawn per sample),
    # because it also needs the prompt it replaces (PiSA-SR's CSD); the loader then keeps prompts
    own_null_prompt: bool = False

    def part(self, name: str) -> Any:
        """The optional part ``name`` (latents, text_encoder, inference), or a ConfigError
        saying that this family has none."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"model family {self.name!r} provides no {name} (ModelFamily.{name}); "
                              "this tool needs it")
        return value


def block_indices(indices: Iterable[int], num_blocks: int) -> frozenset[int]:
    """``indices`` for ``set_activation_checkpointing``, checked against ``num_blocks``."""
    idx = frozenset(int(i) for i in indices)
    bad = sorted(i for i in idx if not 0 <= i < num_blocks)
    if bad:
        raise ValueError(f"activation checkpointing: block indices {bad} out of range "
                         f"0..{num_blocks - 1}")
    return idx


_REGISTRY: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    _REGISTRY[family.name] = family
    return family


def _builtin() -> None:
    from framer_dist.models.dit4sr.family import FAMILY  # noqa: F401  (registers itself)
    from framer_dist.models.pisasr.family import FAMILY as _U  # noqa: F401


def families() -> list[ModelFamily]:
    """The registered families (the built-in ones and any registered since), by name."""
    _builtin()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_family(name: str) -> ModelFamily:
    """The family ``model.family`` names: a registered name or ``module:attribute``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fam = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"config key 'model.family': cannot import {name!r} ({e})") from None
        if not isinstance(fam, ModelFamily):
            raise ConfigError(f"config key 'model.family': {name!r} is a {type(fam).__name__}, "
                              "not a framer_dist.models.ModelFamily")
        return fam
    _builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"config key 'model.family': unknown family {name!r}; registered: "
                          f"{', '.join(sorted(_REGISTRY))} (or a module:attribute import string)")
    return _REGISTRY[name]


def check_family_keys(cfg: Config) -> ModelFamily:
    """model.family, model.preset, train.mode and checkpoint.export against the family (names
    only: ``load_config`` runs it; the family's files are its ``check``, run by the trainer's
    path checks)."""
    fam = get_family(cfg.model.family)
    for key, value, allowed in (("model.preset", cfg.model.preset, fam.presets),
                                ("train.mode", cfg.train.mode, fam.modes)):
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not a {fam.name} {key.split('.')[1]};"
                              f" allowed values: {', '.join(map(repr, allowed))}")
    bad = [k for k in cfg.checkpoint.export if k not in fam.export_kinds]
    if bad:
        raise ConfigError(f"config key 'checkpoint.export': {bad[0]!r} is not an export of the "
                          f"{fam.name} family; allowed values: "
                          f"{', '.join(map(repr, fam.export_kinds)) or 'none'}")
    return fam


__all__ = ["DEFAULT_FAMILY", "InferenceSpec", "block_indices", "LatentCodec", "ModelFamily", "ModelLoadError", "ModelShape",
           "Prompt", "StepContext", "StepOutput", "check_family_keys", "families", "get_family",
           "register_family"]
