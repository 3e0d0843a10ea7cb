"""One typed configuration tree for the whole project.

Loaded from TOML, then dotted command-line overrides (``framer.radius=0.1``) are applied.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key and
what is allowed, before anything expensive (process groups, models) starts.

Field metadata carries the constraints: ``choices`` (allowed values), ``min``/``max`` (inclusive
bounds) and ``doc``. Everything else is plain dataclasses so the schema reads as documentation.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def _f(default: Any, doc: str = "", **meta: Any) -> Any:
    """A dataclass field with a default and constraint metadata."""
    meta["doc"] = doc
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    family: str = _f("dit4sr", "model family: a registered name (dit4sr) or module:attribute "
                     "naming a framer_dist.models.ModelFamily (docs/interfaces.md)")
    preset: str = _f("tiny", "backbone geometry, one of the family's presets (dit4sr: tiny, "
                     "sd3-medium, sd3.5-medium, sd3.5-large; docs/models.md)")
    pretrained: str = _f("", "local diffusers folder with transformer weights ('' = random init)")
    lr_injection_scale: float = _f(1.2, "scale of the depth-wise conv LR injection in the MLP", min=0.0)


@dataclass
class LoraConfig:
    rank: int = _f(16, "LoRA rank", min=1)
    alpha: float = _f(16.0, "LoRA alpha", min=0.0)
    dropout: float = _f(0.0, "LoRA dropout", min=0.0, max=1.0)
    targets: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                             "add_v_proj", "to_add_out"],
                            "attention projections that get adapters (default: every frozen one, "
                            "image and text stream, as diffusers' SD3 LoRA training script)")
    include_mlp: bool = _f(False, "also adapt the feed-forward linears")


@dataclass
class FramerConfig:
    """Every switch of docs/specs/framer.md sections 1-5, with the defaults given there."""

    enabled: bool = _f(True, "off = the DiT4SR baseline")
    feature: Literal["x0", "velocity", "hidden"] = _f("x0", "what F^(i) is (spec section 1)")
    students: str | list[int] = _f(
        "all_but_last", "'all_but_last', 'all' or a list of block indices")
    teacher_layer: int = _f(-1, "block whose readout teaches (-1 = final)")
    mask: Literal["radial", "teacher_quantile"] = _f("radial", "frequency mask mode")
    radius: float = _f(0.2, "radial LF radius as a fraction of Nyquist (seed's 'r = 0.2%')", min=0.0)
    cutoff: float = _f(0.2, "teacher_quantile: quantile of |S_teacher| below which a bin is LF",
                       min=0.0, max=1.0)
    tau: float = _f(1.0, "contrastive temperature", min=1e-6)
    faw: bool = _f(True, "frequency-based adaptive weight")
    fam: bool = _f(True, "frequency-based alignment modulation")
    faw_denominator: Literal["student", "teacher", "none"] = _f(
        "student", "denominator of Delta in FAW")
    eps: float = _f(1e-6, "numerical epsilon of FAW", min=0.0)
    random_negatives: bool = _f(True, "use a random other layer's features as a negative")
    in_batch_negatives: bool = _f(True, "InterCL uses the other images of the global batch")
    lf_loss: Literal["intra", "inter"] = _f("intra", "loss applied to the LF band")
    hf_loss: Literal["intra", "inter"] = _f("inter", "loss applied to the HF band")
    plain_l2: bool = _f(False, "replace the contrastive terms by MSE(student, teacher)")
    weight: float = _f(0.1, "lambda of Eq. 10", min=0.0)
    layer_reduce: Literal["mean", "sum"] = _f("mean", "aggregate over student layers")
    use_rfft: bool = _f(True, "exact half-spectrum shortcut (rfft2 with sqrt(2) weights)")
    nonfinite: Literal["error", "skip"] = _f(
        "error", "NaN/Inf in features: raise naming the layer, or skip the FRAMER term this step")


@dataclass
class FlowConfig:
    shift: float = _f(3.0, "SD3 timestep shift", min=1e-6)
    logit_mean: float = _f(0.0, "logit-normal sigma sampling mean")
    logit_std: float = _f(1.0, "logit-normal sigma sampling std", min=1e-6)
    precondition_outputs: bool = _f(True, "loss on x0 estimate (sigma^2-weighted v-loss)")


@dataclass
class DataConfig:
    source: Literal["synthetic", "folder", "webdataset", "cached"] = _f(
        "synthetic", "where HR images or cached pairs come from")
    path: str = _f("", "folder, shard pattern or cache directory")
    resolution: int = _f(512, "HR crop size in pixels", min=16)
    scale: int = _f(4, "SR factor of the degradation", min=1)
    batch_size: int = _f(1, "micro-batch per rank", min=1)
    num_workers: int = _f(0, "dataloader worker processes", min=0)
    null_prompt_prob: float = _f(0.2, "share of samples trained with the empty prompt",
                                 min=0.0, max=1.0)
    prompt_embeddings: str = _f("", "directory of cached prompt embeddings ('' = random)")
    captions: str = _f("", "JSONL captions keyed by image id")
    vae: str = _f("", "local diffusers VAE folder for online latents ('' = tiny random VAE)")
    degrade_online: bool = _f(True, "degrade on the fly (else read cached pairs)")
    usm_sharpen: bool = _f(True, "USM-sharpen the HR target")
    min_size: int = _f(64, "images smaller than this on either side are skipped (reported); "
                       "larger ones below the crop size are upscaled", min=1)
    prompt_len: int = _f(154, "token length T of random prompt embeddings (77 CLIP + T5 length); "
                         "cached ones bring their own", min=1)
    drop_last: bool = _f(True, "drop the uneven last batch (the teacher-key gather needs equal shapes)")


@dataclass
class TrainConfig:
    mode: str = _f("control", "which parameters train, one of the family's modes (dit4sr: "
                   "control, lora, full)")
    steps: int = _f(1000, "optimizer steps in total", min=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", min=1)
    global_batch_size: int = _f(
        0, "if > 0: kept constant across world sizes by adjusting grad_accum", min=0)
    lr: float = _f(5e-5, "learning rate", min=0.0)
    weight_decay: float = _f(1e-2, "AdamW weight decay", min=0.0)
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    adam_eps: float = _f(1e-8, "AdamW epsilon", min=0.0)
    optimizer: Literal["adamw", "adamw8bit"] = _f("adamw", "optimizer")
    lr_schedule: Literal["constant", "warmup_cosine"] = _f("constant", "LR schedule")
    warmup_steps: int = _f(0, "linear warm-up steps", min=0)
    min_lr_ratio: float = _f(0.0, "cosine floor as a fraction of lr", min=0.0, max=1.0)
    grad_clip: float = _f(1.0, "global grad-norm clip (0 = off)", min=0.0)
    precision: Literal["fp32", "bf16"] = _f("bf16", "compute precision (master weights fp32)")
    frozen_bf16: bool = _f(
        True, "backend 'none' with precision bf16: hold the frozen Linear/Conv weights in bf16 "
              "(autocast casts them to bf16 at every use anyway: bit-identical results, about half "
              "the frozen weights' memory, no per-use casts; DeepSpeed holds the whole module in bf16)")
    seed: int = _f(0, "global seed")
    ema: bool = _f(False, "keep an EMA of the trainable parameters")
    ema_decay: float = _f(0.9999, "EMA decay", min=0.0, max=1.0)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "compute device")
    out_dir: str = _f("runs/default", "run directory (checkpoints, logs, samples)")


@dataclass
class ParallelConfig:
    backend: Literal["none", "deepspeed", "fsdp2"] = _f("none", "data-parallel backend")
    ds_config: str = _f("", "DeepSpeed JSON (ds_configs/...)")
    activation_checkpointing: Literal["none", "all", "every_k", "blocks"] = _f(
        "none", "which transformer blocks recompute activations in backward")
    ac_every_k: int = _f(2, "with 'every_k': checkpoint every k-th block", min=1)
    ac_blocks: list[int] = _f([], "with 'blocks': the block indices to checkpoint")
    compile: bool = _f(False, "torch.compile each transformer block")
    reshard_after_forward: bool = _f(
        True, "FSDP2: free each block's gathered params after its forward (the root keeps its own "
              "until backward ends)")
    zero3_persist_head: bool = _f(
        True, "DeepSpeed ZeRO-3: keep the output head (norm_out, proj_out; the FRAMER readout runs "
              "it after every block) gathered on every rank instead of fetching it at each use "
              "(SD3.5: 4.7 M more resident parameters per rank)")


@dataclass
class CheckpointConfig:
    dir: str = _f("", "checkpoint root ('' = <out_dir>/checkpoints)")
    every: int = _f(500, "save every N optimizer steps (0 = only at the end/preemption)", min=0)
    keep_last: int = _f(3, "keep the newest k checkpoints", min=1)
    resume: str = _f("", "'' (fresh), 'auto' (newest valid) or a checkpoint path")
    export: list[str] = _f([], "exports at the end: any of 'diffusers', 'control', 'lora'",
                           item_choices=["diffusers", "control", "lora"])
    preempt_signal: Literal["SIGUSR1", "SIGUSR2", "none"] = _f(
        "SIGUSR1", "signal that requests a collective save and requeue (SIGTERM always does)")
    requeue_exit_code: int = _f(75, "exit code after a preemption save", min=1, max=255)


@dataclass
class LogConfig:
    dir: str = _f("", "TensorBoard directory ('' = <out_dir>/tb)")
    every: int = _f(10, "scalar logging period in steps", min=1)
    heatmap_every: int = _f(100, "per-layer FRAMER heat map period (0 = off)", min=0)
    per_layer_scalars: bool = _f(False, "also log per-layer FRAMER scalars")
    val_every: int = _f(0, "validation super-resolution period (0 = off)", min=0)
    progress: bool = _f(True, "rank-0 progress bar")
    all_ranks: bool = _f(False, "log from every rank (debugging)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    framer: FramerConfig = field(default_factory=FramerConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# validation


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to float)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': {value!r} is not allowed; "
                              f"allowed values: {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in get_args(tp):
            try:
                return _coerce(key, alt, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} matches none of "
                          f"{' | '.join(_type_name(a) for a in get_args(tp))}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(item_tp)}, "
                              f"got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # schema bug, not user input


def _check_bounds(key: str, f: dataclasses.Field, value: Any) -> None:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"config key '{key}': {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"config key '{key}': {value!r} is above the maximum {hi}")
    item_choices = f.metadata.get("item_choices")
    if item_choices is not None:
        for v in value:
            if v not in item_choices:
                raise ConfigError(f"config key '{key}': {v!r} is not allowed; "
                                  f"allowed values: {', '.join(map(repr, item_choices))}")


def _unknown(key: str, known: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; known keys here: {', '.join(known)}")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown(key, list(fields))
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; expected a table, got {value!r}")
            _apply(getattr(obj, name), value, prefix=f"{key}.")
            continue
        value = _coerce(key, tp, value)
        _check_bounds(key, fields[name], value)
        setattr(obj, name, value)


def _cross_checks(cfg: Config) -> None:
    """Constraints that involve several keys."""
    from framer_dist.models import check_family_keys  # model.preset, train.mode, exports
    check_family_keys(cfg)
    if len(cfg.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        raise ConfigError(f"config key 'train.betas': expected two numbers in [0, 1), got {cfg.train.betas}")
    s = cfg.framer.students
    if isinstance(s, str) and s not in ("all", "all_but_last"):
        raise ConfigError(f"config key 'framer.students': {s!r} is not allowed; "
                          "allowed values: 'all', 'all_but_last' or a list of block indices")
    if cfg.parallel.backend == "deepspeed" and not cfg.parallel.ds_config:
        raise ConfigError("config key 'parallel.ds_config': the deepspeed backend needs a "
                          "DeepSpeed JSON (e.g. --ds ds_configs/zero3.json)")
    if cfg.parallel.activation_checkpointing == "blocks" and not cfg.parallel.ac_blocks:
        raise ConfigError("config key 'parallel.ac_blocks': activation_checkpointing='blocks' "
                          "needs a non-empty list of block indices")
    if cfg.data.source != "synthetic" and not cfg.data.path:
        raise ConfigError(f"config key 'data.path': data.source={cfg.data.source!r} needs a path")
    d = cfg.data
    if d.source in ("folder", "webdataset") and d.resolution % (d.scale * 8):  # 8: the VAE factor
        raise ConfigError(f"config key 'data.resolution': {d.resolution} must be a multiple of "
                          f"data.scale x 8 = {d.scale * 8} (the LR crop is VAE-encoded)")


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value); the value is read as a TOML literal, else a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config: defaults <- TOML file <- dotted overrides; validate everything."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
        _apply(cfg, data)
    for ov in overrides:
        key, value = parse_override(ov)
        if "." not in key:
            raise ConfigError(f"override {ov!r}: expected section.key=value "
                              f"(sections: {', '.join(f.name for f in dataclasses.fields(cfg))})")
        _apply(cfg, _nest(key, value))
    _cross_checks(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild (and validate) a config from ``Config.to_dict()`` output, e.g. a checkpoint's."""
    cfg = Config()
    _apply(cfg, data)
    _cross_checks(cfg)
    return cfg


def dump_toml(cfg: Config) -> str:
    """Write the config as TOML (lists and scalars only, which is all the schema has)."""
    def lit(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(lit(x) for x in v) + "]"
        return repr(v)

    lines = []
    for sec, values in cfg.to_dict().items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {lit(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
