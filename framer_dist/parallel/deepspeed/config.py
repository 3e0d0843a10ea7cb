"""The DeepSpeed JSON (``parallel.ds_config``), read and checked once.

Our config is the single source of truth for precision, micro-batch, accumulation and clipping:
they are injected into the DeepSpeed JSON, and a JSON that says otherwise is an error. The
optimizer and LR schedule are ours too (client objects), so a JSON that has them is refused.
ZeRO-3's fetch units (``zero_optimization.leaf_module``) are the model family's blocks unless the
JSON names its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from framer_dist.config import ConfigError
from framer_dist.parallel.base import BackendConfig


def load_ds_json(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'parallel.ds_config': file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key 'parallel.ds_config': {p} is not valid JSON: {e}") from None


def build_ds_config(cfg: BackendConfig, grad_accum: int, world_size: int,
                    leaf_classes: Sequence[str] = ()) -> dict[str, Any]:
    """The DeepSpeed config: the JSON's ZeRO settings plus our precision/batch/clip values.
    Under ZeRO-3, ``leaf_classes`` (the model's block classes, ``blocks.block_classes``) become
    ``zero_optimization.leaf_module.classes`` when the JSON has no ``leaf_module`` entry; one the
    JSON has (``{"classes": []}`` turns leaves off) is kept as it is."""
    src = cfg.parallel.ds_config
    ds = load_ds_json(src)
    for sec, ours in (("optimizer", "train.optimizer / train.lr"), ("scheduler", "train.lr_schedule")):
        if sec in ds:
            raise ConfigError(f"{src}: remove the '{sec}' section; the optimizer and schedule come "
                              f"from our config ({ours}) and are passed to DeepSpeed as client objects")
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{src}: fp16 is not supported; use train.precision='bf16' (or 'fp32')")
    want_bf16 = cfg.train.precision == "bf16"
    bf16 = dict(ds.get("bf16", {}))
    if bf16.get("enabled", "auto") != "auto" and bool(bf16["enabled"]) != want_bf16:
        raise ConfigError(
            f"{src} says bf16.enabled={bf16['enabled']} but config key 'train.precision' is "
            f"{cfg.train.precision!r}; set bf16.enabled to \"auto\" (recommended) or make them agree")
    bf16["enabled"] = want_bf16
    ds["bf16"] = bf16
    ours = {"train_micro_batch_size_per_gpu": (cfg.micro_batch, "data.batch_size"),
            "gradient_accumulation_steps": (grad_accum, "train.grad_accum/global_batch_size"),
            "gradient_clipping": (cfg.train.grad_clip, "train.grad_clip")}
    for key, (value, our_key) in ours.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"{src} sets {key}={ds[key]} but our config key '{our_key}' gives "
                              f"{value}; set it to \"auto\" or remove it from the JSON")
        ds[key] = value
    tbs = cfg.micro_batch * grad_accum * world_size
    if ds.get("train_batch_size", "auto") not in ("auto", tbs):
        raise ConfigError(f"{src} sets train_batch_size={ds['train_batch_size']}, but micro batch x "
                          f"accumulation x world = {tbs}; set it to \"auto\"")
    ds["train_batch_size"] = tbs
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage must be 0-3, got {zero.get('stage')}")
    if zero.get("stage", 0) == 3 and "leaf_module" not in zero and leaf_classes:
        # every block one fetch unit (one coalesced all-gather, one set of hooks), the unit
        # FSDP2 shards too; the family's blocks, so no JSON names a model's classes
        zero["leaf_module"] = {"classes": list(leaf_classes)}
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # Our client optimizer steps on the CPU shards; DeepSpeed would otherwise insist on its
        # JIT-compiled DeepSpeedCPUAdam.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds["zero_allow_untested_optimizer"] = True  # bitsandbytes AdamW8bit is a client optimizer
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
