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


def option(default: Any, doc: str = "", **meta: Any) -> Any:
    """A dataclass field with a default and constraint metadata."""
    meta["doc"] = doc
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    family: str = option("dit4sr", "model family: a registered name (dit4sr, pisasr) or module:attribute "
                     "naming a framer_dist.models.ModelFamily (docs/interfaces.md)")
    preset: str = option("tiny", "backbone geometry, one of the family's presets (dit4sr: tiny, "
                     "sd3-medium, sd3.5-medium, sd3.5-large; docs/models.md; pisasr: unet-tiny, "
                     "sd2.1-base; docs/framer_u.md)")
    pretrained: str = option("", "local diffusers folder with the backbone's weights (dit4sr: "
                         "transformer/, pisasr: unet/; '' = random init)")


@dataclass
class FramerConfig:
    """Every switch of docs/specs/framer.md sections 1-5, with the defaults given there."""

    enabled: bool = option(True, "off = the DiT4SR baseline")
    feature: Literal["x0", "velocity", "hidden"] = option("x0", "what F^(i) is (spec section 1)")
    students: str | list[int] = option(
        "all_but_last", "'all_but_last', 'all' or a list of block indices")
    teacher_layer: int = option(-1, "block whose readout teaches (-1 = final)")
    mask: Literal["radial", "teacher_quantile"] = option("radial", "frequency mask mode")
    radius: float = option(0.2, "radial LF radius as a fraction of Nyquist (seed's 'r = 0.2%')", min=0.0)
    cutoff: float = option(0.2, "teacher_quantile: quantile of |S_teacher| below which a bin is LF",
                       min=0.0, max=1.0)
    tau: float = option(1.0, "contrastive temperature", min=1e-6)
    faw: bool = option(True, "frequency-based adaptive weight")
    fam: bool = option(True, "frequency-based alignment modulation")
    faw_denominator: Literal["student", "teacher", "none"] = option(
        "student", "denominator of Delta in FAW")
    eps: float = option(1e-6, "numerical epsilon of FAW", min=0.0)
    random_negatives: bool = option(True, "use a random other layer's features as a negative")
    in_batch_negatives: bool = option(True, "InterCL uses the other images of the global batch")
    lf_loss: Literal["intra", "inter"] = option("intra", "loss applied to the LF band")
    hf_loss: Literal["intra", "inter"] = option("inter", "loss applied to the HF band")
    plain_l2: bool = option(False, "replace the contrastive terms by MSE(student, teacher)")
    weight: float = option(0.1, "lambda of Eq. 10", min=0.0)
    layer_reduce: Literal["mean", "sum"] = option("mean", "aggregate over student layers")
    use_rfft: bool = option(True, "exact half-spectrum shortcut (rfft2 with sqrt(2) weights)")
    nonfinite: Literal["error", "skip"] = option(
        "error", "NaN/Inf in features: raise naming the layer, or skip the FRAMER term this step")


@dataclass
class DataConfig:
    source: Literal["synthetic", "folder", "webdataset", "cached"] = option(
        "synthetic", "where HR images or cached pairs come from")
    path: str = option("", "folder, shard pattern or cache directory")
    resolution: int = option(512, "HR crop size in pixels", min=16)
    scale: int = option(4, "SR factor of the degradation", min=1)
    batch_size: int = option(1, "micro-batch per rank", min=1)
    num_workers: int = option(0, "dataloader worker processes", min=0)
    null_prompt_prob: float = option(0.2, "share of samples trained with the empty prompt",
                                 min=0.0, max=1.0)
    prompt_embeddings: str = option("", "directory of cached prompt embeddings ('' = random)")
    captions: str = option("", "JSONL captions keyed by image id")
    vae: str = option("", "local diffusers VAE folder for online latents ('' = tiny random VAE)")
    degrade_online: bool = option(True, "degrade on the fly (else read cached pairs)")
    usm_sharpen: bool = option(True, "USM-sharpen the HR target")
    min_size: int = option(64, "images smaller than this on either side are skipped (reported); "
                       "larger ones below the crop size are upscaled", min=1)
    prompt_len: int = option(154, "token length T of random prompt embeddings (77 CLIP + T5 length); "
                         "cached ones bring their own", min=1)
    drop_last: bool = option(True, "drop the uneven last batch (the teacher-key gather needs equal shapes)")


@dataclass
class TrainConfig:
    mode: str = option("control", "which parameters train, one of the family's modes (dit4sr: "
                   "control, lora, full; pisasr: its stages pix, sem)")
    steps: int = option(1000, "optimizer steps in total", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    global_batch_size: int = option(
        0, "if > 0: kept constant across world sizes by adjusting grad_accum", min=0)
    lr: float = option(5e-5, "learning rate", min=0.0)
    weight_decay: float = option(1e-2, "AdamW weight decay", min=0.0)
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    adam_eps: float = option(1e-8, "AdamW epsilon", min=0.0)
    optimizer: Literal["adamw", "adamw8bit"] = option("adamw", "optimizer")
    lr_schedule: Literal["constant", "warmup_cosine"] = option("constant", "LR schedule")
    warmup_steps: int = option(0, "linear warm-up steps", min=0)
    min_lr_ratio: float = option(0.0, "cosine floor as a fraction of lr", min=0.0, max=1.0)
    grad_clip: float = option(1.0, "global grad-norm clip (0 = off)", min=0.0)
    precision: Literal["fp32", "bf16"] = option("bf16", "compute precision (master weights fp32)")
    frozen_bf16: bool = option(
        True, "backend 'none' with precision bf16: hold the frozen Linear/Conv weights in bf16 "
              "(autocast casts them to bf16 at every use anyway: bit-identical results, about half "
              "the frozen weights' memory, no per-use casts; DeepSpeed holds the whole module in bf16)")
    seed: int = option(0, "global seed")
    ema: bool = option(False, "keep an EMA of the trainable parameters")
    ema_decay: float = option(0.9999, "EMA decay", min=0.0, max=1.0)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "compute device")
    out_dir: str = option("runs/default", "run directory (checkpoints, logs, samples)")


@dataclass
class ParallelConfig:
    backend: Literal["none", "deepspeed", "fsdp2"] = option("none", "data-parallel backend")
    ds_config: str = option("", "DeepSpeed JSON (ds_configs/...)")
    activation_checkpointing: Literal["none", "all", "every_k", "blocks"] = option(
        "none", "which transformer blocks recompute activations in backward")
    ac_every_k: int = option(2, "with 'every_k': checkpoint every k-th block", min=1)
    ac_blocks: list[int] = option([], "with 'blocks': the block indices to checkpoint")
    compile: bool = option(False, "torch.compile each transformer block")
    reshard_after_forward: bool = option(
        True, "FSDP2: free each block's gathered params after its forward (the root keeps its own "
              "until backward ends)")
    zero3_persist_head: bool = option(
        True, "DeepSpeed ZeRO-3: keep the output head (norm_out, proj_out; the FRAMER readout runs "
              "it after every block) gathered on every rank instead of fetching it at each use "
              "(SD3.5: 4.7 M more resident parameters per rank)")


@dataclass
class CheckpointConfig:
    dir: str = option("", "checkpoint root ('' = <out_dir>/checkpoints)")
    every: int = option(500, "save every N optimizer steps (0 = only at the end/preemption)", min=0)
    keep_last: int = option(3, "keep the newest k checkpoints", min=1)
    resume: str = option("", "'' (fresh), 'auto' (newest valid) or a checkpoint path")
    export: list[str] = option([], "exports at the end: any of 'diffusers', 'control', 'lora'",
                           item_choices=["diffusers", "control", "lora"])
    preempt_signal: Literal["SIGUSR1", "SIGUSR2", "none"] = option(
        "SIGUSR1", "signal that requests a collective save and requeue (SIGTERM always does)")
    requeue_exit_code: int = option(75, "exit code after a preemption save", min=1, max=255)


@dataclass
class LogConfig:
    dir: str = option("", "TensorBoard directory ('' = <out_dir>/tb)")
    every: int = option(10, "scalar logging period in steps", min=1)
    heatmap_every: int = option(100, "per-layer FRAMER heat map period (0 = off)", min=0)
    per_layer_scalars: bool = option(False, "also log per-layer FRAMER scalars")
    val_every: int = option(0, "validation super-resolution period (0 = off)", min=0)
    progress: bool = option(True, "rank-0 progress bar")
    all_ranks: bool = option(False, "log from every rank (debugging)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    framer: FramerConfig = field(default_factory=FramerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # The active model family's own section: the TOML table named after the family (``[dit4sr]``),
    # typed by the family (``ModelFamily.config``); None for a family without keys. load_config
    # builds it for model.family; a bare Config() gets the default family's defaults.
    family_section: Any = field(default=None, metadata={"family_section": True})

    def __post_init__(self) -> None:
        if self.family_section is None:
            self.family_section = _family_defaults(self.model.family)

    def section_of(self, cls: type, name: str) -> Any:
        """The family section, which must be a ``cls`` (family ``name``'s), else a ConfigError."""
        if not isinstance(self.family_section, cls):
            raise ConfigError(f"config: model.family is {self.model.family!r}, not {name!r} "
                              f"(the [{name}] section is not active)")
        return self.family_section

    def to_dict(self) -> dict[str, Any]:
        """Every section as plain data; the family section under the family's name."""
        out = {f.name: dataclasses.asdict(getattr(self, f.name))
               for f in dataclasses.fields(self) if f.name != "family_section"}
        if self.family_section is not None:
            out[_family(self.model.family).name] = dataclasses.asdict(self.family_section)
        return out


def _family(name: str) -> Any:
    from framer_dist.models import get_family  # the registry imports this module
    return get_family(name)


def _family_defaults(name: str) -> Any:
    fam = _family(name)
    return fam.config() if fam.config is not None else None


def _moved(key: str) -> str | None:
    """Where a key of an older config format lives now (a family took it into its section)."""
    from framer_dist.models import families
    for fam in families():
        for old, new in fam.moved_keys:
            if key == old or key.startswith(old + "."):
                return new + key[len(old):]
    return None


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
    moved = _moved(key)
    if moved:
        return ConfigError(f"config key '{key}' is now '{moved}' (a model family's keys live in "
                           "the family's own section; docs/training.md, Sections)")
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; known keys here: {', '.join(known)}")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj) if not f.metadata.get("family_section")}
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


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _build(sources: list[dict[str, Any]]) -> Config:
    """defaults <- each source in turn (nested dicts as from TOML); the family section is applied
    once model.family is known, then everything is cross-checked."""
    cfg = Config()
    core = {f.name for f in dataclasses.fields(cfg) if not f.metadata.get("family_section")}
    tables: dict[str, Any] = {}  # top-level names that are not core sections
    for data in sources:
        _apply(cfg, {k: v for k, v in data.items() if k in core})
        _merge(tables, {k: v for k, v in data.items() if k not in core})
    fam = _family(cfg.model.family)
    cfg.family_section = fam.config() if fam.config is not None else None
    for name, table in tables.items():
        if name == fam.name and cfg.family_section is not None:
            if not isinstance(table, dict):
                raise ConfigError(f"config key '{name}' is a section; expected a table, got {table!r}")
            _apply(cfg.family_section, table, prefix=f"{name}.")
            continue
        from framer_dist.models import families
        if name in {f.name for f in families()}:
            raise ConfigError(f"config section '{name}' holds keys of the {name} family, but "
                              f"model.family is {cfg.model.family!r}; remove it or set model.family")
        known = sorted(core) + ([fam.name] if fam.config is not None else [])
        key = name
        while isinstance(table, dict) and table:  # name the first key: 'lora.rank', not 'lora'
            sub, table = next(iter(table.items()))
            key = f"{key}.{sub}"
        raise _unknown(key, known) if _moved(key) else _unknown(name, known)
    _cross_checks(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config: defaults <- TOML file <- dotted overrides; validate everything."""
    sources: list[dict[str, Any]] = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            sources.append(tomllib.loads(p.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    for ov in overrides:
        key, value = parse_override(ov)
        if "." not in key:
            raise ConfigError(f"override {ov!r}: expected section.key=value "
                              f"(sections: {', '.join(f.name for f in dataclasses.fields(Config))})")
        sources.append(_nest(key, value))
    return _build(sources)


def _pop_path(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    *parents, leaf = dotted.split(".")
    cur = data
    for p in parents:
        cur = cur.get(p)
        if not isinstance(cur, dict):
            return False, None
    return (True, cur.pop(leaf)) if leaf in cur else (False, None)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild (and validate) a config from ``Config.to_dict()`` output, e.g. a checkpoint's. A
    dict written before the family seam (its family's keys in their old places) is read too."""
    import copy

    data = copy.deepcopy(data)
    fam = _family(data.get("model", {}).get("family", "dit4sr"))
    for old, new in fam.moved_keys:
        found, value = _pop_path(data, old)
        if found:
            _merge(data, _nest(new, value))
    return _build([data])


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

    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {lit(v)}" for k, v in values.items() if not isinstance(v, dict))
        lines.append("")
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for sec, values in cfg.to_dict().items():
        table(sec, values)
    return "\n".join(lines)
