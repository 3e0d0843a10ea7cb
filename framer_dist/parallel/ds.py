"""The `deepspeed` backend: ZeRO-2/3 with a client optimizer (torch AdamW or bitsandbytes 8-bit).

Our config is the single source of truth for precision, micro-batch, accumulation and clipping:
they are injected into the DeepSpeed JSON, and a JSON that says otherwise is an error.

ZeRO-3 fetch granularity: DeepSpeed's own ``zero_optimization.leaf_module`` (classes, names or
name suffixes; ``ds_configs/zero3.json`` names ``DiT4SRBlock``) makes each transformer block one
fetch unit (one coalesced all-gather, one set of hooks) instead of one per Linear/norm. Two
things this module adds so that works and pays off (docs/distributed.md, "ZeRO-3 fetch units"):

* DeepSpeed reduces a leaf's gradients from a *full backward hook* on the leaf. When none of the
  leaf's inputs requires grad (the first block in control and LoRA modes: its inputs come from
  frozen embedders) torch fires that hook as soon as the gradient of the leaf's *outputs* exists,
  before any parameter gradient: DeepSpeed then fills ``param.grad`` with ``zeros_like`` of the
  released (0-element) parameter and the real gradient fails to accumulate ("The size of tensor
  a (0) must match ..."). :func:`guard_leaf_inputs` makes the smallest floating input of such a
  call require grad, so the hook fires after the block's backward as intended.
* ``parallel.zero3_persist_head``: the output head the FRAMER readout uses after every block
  stays gathered (DeepSpeed's persistent parameters), see :func:`persist_modules`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from framer_dist.config import Config, ConfigError
from framer_dist.parallel.base import Backend
from framer_dist.parallel.names import strip_wrapper_prefixes, trainable_names
from framer_dist.parallel.optim import build_optimizer, lr_lambda
from framer_dist.parallel.process_group import init_process_group, local_rank_from_env, resolve_device
from framer_dist.safe_load import load_torch, safe_torch_loads

TAG = "ds"                # DeepSpeed tag directory inside our checkpoint directory
UNIVERSAL = "ds_universal"  # universal conversion, created on demand for a world-size change


def load_ds_json(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'parallel.ds_config': file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key 'parallel.ds_config': {p} is not valid JSON: {e}") from None


def build_ds_config(cfg: Config, grad_accum: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: the JSON's ZeRO settings plus our precision/batch/clip values."""
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
    ours = {"train_micro_batch_size_per_gpu": (cfg.data.batch_size, "data.batch_size"),
            "gradient_accumulation_steps": (grad_accum, "train.grad_accum/global_batch_size"),
            "gradient_clipping": (cfg.train.grad_clip, "train.grad_clip")}
    for key, (value, our_key) in ours.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"{src} sets {key}={ds[key]} but our config key '{our_key}' gives "
                              f"{value}; set it to \"auto\" or remove it from the JSON")
        ds[key] = value
    tbs = cfg.data.batch_size * grad_accum * world_size
    if ds.get("train_batch_size", "auto") not in ("auto", tbs):
        raise ConfigError(f"{src} sets train_batch_size={ds['train_batch_size']}, but micro batch x "
                          f"accumulation x world = {tbs}; set it to \"auto\"")
    ds["train_batch_size"] = tbs
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage must be 0-3, got {zero.get('stage')}")
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # Our client optimizer steps on the CPU shards; DeepSpeed would otherwise insist on its
        # JIT-compiled DeepSpeedCPUAdam.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds["zero_allow_untested_optimizer"] = True  # bitsandbytes AdamW8bit is a client optimizer
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _skip_cpu_shm_op() -> None:
    """On CPU, deepspeed.init_distributed JIT-compiles a shared-memory all-reduce op (~60 s). It
    only speeds up CPU collectives, which we use for tests and the demo; gloo is enough. Set
    FRAMER_DS_SHM=1 to keep it. (The module object must come from importlib: `import
    deepspeed.comm.torch as m` binds the torch package.)"""
    if os.environ.get("FRAMER_DS_SHM") == "1":
        return
    mod = importlib.import_module("deepspeed.comm.torch")
    if hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda: None


# torch deprecated the collectives DeepSpeed's ZeRO uses (all_gather_into_tensor,
# reduce_scatter_tensor) with a FutureWarning per call site, re-armed whenever the warning filters
# change: most of a ZeRO-3 run's output on every rank. Not ours to act on; exactly those two are
# hidden, every other warning stays.
DEPRECATED_COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor")


def quiet_deprecated_collectives() -> None:
    """Ignore torch's FutureWarning about DEPRECATED_COLLECTIVES (idempotent)."""
    for name in DEPRECATED_COLLECTIVES:
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated",
                                category=FutureWarning)


def _leaf_input_needs_grad(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook of a ZeRO-3 leaf with trainable parameters: when grad is on and no
    floating tensor argument requires grad, replace the smallest one with a detached copy that
    does (no data copy). Its gradient is computed and dropped; the only cost is that the leaf's
    backward also computes input gradients (the frozen layers' dX) in that one call."""
    if not torch.is_grad_enabled():
        return None
    found = [(i, a) for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()]
    if not found or any(a.requires_grad for _, a in found):
        return None
    i, a = min(found, key=lambda t: t[1].numel())
    out = list(args)
    out[i] = a.detach().requires_grad_(True)
    return tuple(out)


def guard_leaf_inputs(module: nn.Module) -> list[str]:
    """Register :func:`_leaf_input_needs_grad` (first in order, before DeepSpeed's own pre-hooks
    and before torch sets up the full backward hook) on every ZeRO-3 leaf module that holds
    trainable parameters. Returns the leaves' names."""
    from deepspeed.utils import z3_leaf_module

    names = []
    for n, m in module.named_modules():
        if z3_leaf_module(m):
            names.append(n)
            if any(p.requires_grad for p in m.parameters()):
                m.register_forward_pre_hook(_leaf_input_needs_grad, prepend=True)
    return names


def persist_modules(engine: Any, names: Iterable[str]) -> int:
    """Mark the parameters of the named submodules of ``engine.module`` as ZeRO-3 persistent, as
    DeepSpeed does for parameters under ``stage3_param_persistence_threshold``: gathered at the
    first use, never released between uses, partitioned for the optimizer step and gathered again
    right after it (one all-gather per step instead of one per use). Returns how many parameter
    elements became persistent (each rank then holds them in full)."""
    optimizer = engine.optimizer
    persistent = optimizer.persistent_parameters
    # the optimizer and the parameter coordinator share this list (stage3.py)
    assert persistent is optimizer.parameter_offload.persistent_parameters
    modules = dict(engine.module.named_modules())
    added = 0
    for name in names:
        for p in modules[name].parameters():
            if not p.ds_persist:
                p.ds_persist = True
                persistent.append(p)
                added += p.ds_numel
    return added


@contextlib.contextmanager
def zero3_fetch_counter() -> Iterator[dict[str, int]]:
    """Count what ZeRO-3's parameter coordinator does inside the block (for benchmarks and tests;
    it patches the coordinator class while active): ``hook_fetches`` (module fetch requests from
    the forward/backward hooks), ``allgathers`` (coalesced all-gather launches, prefetches
    included), ``params_gathered`` / ``numel_gathered``, ``releases`` (parameters partitioned
    again). The once-per-step gather of persistent parameters after the optimizer step goes
    around the coordinator and is not counted."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    cls = ppc.PartitionedParameterCoordinator
    gather_name = "_PartitionedParameterCoordinator__all_gather_params_"
    release_name = "_PartitionedParameterCoordinator__release_param"
    orig_fetch, orig_gather, orig_release = (cls.fetch_sub_module, getattr(cls, gather_name),
                                             getattr(cls, release_name))
    counts = {"hook_fetches": 0, "allgathers": 0, "params_gathered": 0, "numel_gathered": 0,
              "releases": 0}
    unavailable = ppc.ZeroParamStatus.NOT_AVAILABLE

    def fetch(self: Any, sub_module: nn.Module, forward: bool) -> None:
        counts["hook_fetches"] += 1
        return orig_fetch(self, sub_module, forward)

    def gather(self: Any, params: Any, forward: bool, quantize: bool = False) -> None:
        todo = [p for p in params if p.ds_status == unavailable]
        if todo:
            counts["allgathers"] += 1
            counts["params_gathered"] += len(todo)
            counts["numel_gathered"] += sum(p.ds_numel for p in todo)
        return orig_gather(self, params, forward, quantize)

    def release(self: Any, param: Any, free_data: bool = True) -> None:
        if param.ds_status == ppc.ZeroParamStatus.AVAILABLE and not param.ds_active_sub_modules:
            counts["releases"] += 1
        return orig_release(self, param, free_data)

    cls.fetch_sub_module = fetch
    setattr(cls, gather_name, gather)
    setattr(cls, release_name, release)
    try:
        yield counts
    finally:
        cls.fetch_sub_module = orig_fetch
        setattr(cls, gather_name, orig_gather)
        setattr(cls, release_name, orig_release)


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    @classmethod
    def create(cls, cfg: Config, model: nn.Module, params: list[nn.Parameter]) -> "DeepSpeedBackend":
        # checked before joining the process group; ZeRO-3 partitions the parameter
        # objects, so the trainable ones are remembered by name
        trainable = list(trainable_names(model, params).values())
        device = resolve_device(cfg, local_rank_from_env())
        rank, world, local_rank = init_process_group("deepspeed", device.type)
        if device.type == "cpu":
            _skip_cpu_shm_op()
        quiet_deprecated_collectives()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
        self = cls(cfg, model, rank, world, local_rank, device)
        self.ds_config = build_ds_config(cfg, self.grad_accum, world)
        self.stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        self.trainable_names = trainable
        optimizer = build_optimizer(cfg, params)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        self.engine = engine
        self.model = engine
        self._micro = 0
        self.zero3_leaves: list[str] = []
        self.zero3_persistent_numel = 0
        if self.stage == 3:
            self.zero3_leaves = guard_leaf_inputs(engine.module)
            head = getattr(model, "readout_head_modules", ())
            if cfg.parallel.zero3_persist_head and head:
                self.zero3_persistent_numel = persist_modules(engine, head)
        if cfg.train.ema:
            self.ema = _DSEma(self, cfg.train.ema_decay)  # type: ignore[assignment]
        return self

    # -- training ------------------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        # DeepSpeed scales by 1/gradient_accumulation_steps itself and counts micro-steps in
        # engine.step(); the non-boundary calls only advance that counter.
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.grad_accum:
            self.engine.step()

    def step(self) -> float:
        if self._micro != self.grad_accum:
            raise RuntimeError(f"step() after {self._micro} backward() calls; expected "
                               f"{self.grad_accum} (grad_accum)")
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if self.engine.skipped_steps > skipped_before:
            # DeepSpeed dropped the update (non-finite gradients): weights and LR schedule did not
            # move, so neither do the step count and the EMA (the other backends apply the step)
            if self.is_main:
                print(f"[framer_dist] WARNING: DeepSpeed skipped an optimizer step (gradient norm "
                      f"{norm}); weights, LR schedule and EMA unchanged", flush=True)
            return norm
        self.optimizer_step += 1
        if self.ema is not None:
            self.ema.update()
        return norm

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path: str | Path, client_state: dict[str, Any]) -> None:
        path = Path(path)
        # Frozen weights are not written (they come from model.pretrained or the seeded init):
        # under ZeRO-2 they would otherwise be a full bf16 copy of the backbone in every checkpoint.
        self.engine.save_checkpoint(str(path), tag=TAG, client_state={"optimizer_step": self.optimizer_step},
                                    save_latest=False, exclude_frozen_parameters=True)
        if self.ema is not None:
            self.ema.save(path)
        self._write_meta(path, client_state, {"optimizer": self.cfg.train.optimizer,
                                              "zero_stage": self.stage})

    def load(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        meta = self._check_meta(path)
        # DeepSpeed unpickles with weights_only=False in its checkpoint engine, the universal
        # conversion and loader and zero_to_fp32; inside this scope every one of those loads is
        # weights-only with our allow-list (framer_dist.safe_load)
        with safe_torch_loads():
            return self._load(path, meta)

    def _load(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        if int(meta.get("zero_stage", self.stage)) != self.stage and meta["world_size"] == self.world_size:
            raise RuntimeError(f"checkpoint {path} was written with ZeRO stage {meta['zero_stage']}, "
                               f"but {self.cfg.parallel.ds_config} uses stage {self.stage}")
        if meta["world_size"] == self.world_size:
            loaded, cs = self.engine.load_checkpoint(str(path), tag=TAG, load_module_strict=False)
            if loaded is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path / TAG}")
        elif meta["optimizer"] == "adamw8bit":
            cs = self._load_weights_only(path, meta)
        else:
            cs = self._load_universal(path, meta)
        self.optimizer_step = int((cs or {}).get("optimizer_step", 0))
        sched = self.engine.lr_scheduler
        if sched is not None:
            # LambdaLR.load_state_dict does not touch the groups' LR: where the optimizer state
            # was not loaded with them (the weights-only 8-bit path) the next step would use the
            # schedule's first LR
            for g, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
                g["lr"] = lr
        if self.ema is not None:
            self.ema.load(path, meta)
        return self._read_client_state(path)

    def _load_universal(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """World size changed: convert once to a universal checkpoint (rank 0), then load it."""
        from deepspeed.checkpoint import ds_to_universal

        out = path / UNIVERSAL
        if self.is_main and not (out / ".done").is_file():
            tmp = path / f".tmp-{UNIVERSAL}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            args = argparse.Namespace(input_folder=str(path / TAG), output_folder=str(tmp),
                                      num_extract_workers=1, num_merge_workers=1,
                                      keep_temp_folder=False, strict=True,
                                      # ZeRO-1/2 checkpoints lack the Megatron-style
                                      # universal_checkpoint_info; let DeepSpeed add it
                                      inject_missing_state=True)
            print(f"[framer_dist] checkpoint {path} was written on {meta['world_size']} ranks, "
                  f"resuming on {self.world_size}: converting it to a DeepSpeed universal checkpoint")
            ds_to_universal.main(args)
            (tmp / ".done").write_text("ok\n")
            os.rename(tmp, out)
        self.barrier()
        conf = self.engine._config
        prev = conf.load_universal_checkpoint
        conf.load_universal_checkpoint = True
        try:
            _, cs = self.engine.load_checkpoint(str(path), tag=UNIVERSAL, load_module_strict=False)
        finally:
            conf.load_universal_checkpoint = prev
        return cs or {}

    def _load_weights_only(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """bitsandbytes 8-bit state cannot go through the universal conversion (it fails with
        KeyError 'exp_avg'): restore the fp32 weights and the LR schedule, restart the moments."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        msg = (f"checkpoint {path} was written on {meta['world_size']} ranks with the bitsandbytes "
               f"8-bit optimizer and is resumed on {self.world_size} ranks: DeepSpeed's universal "
               f"conversion cannot carry 8-bit optimizer state, so ONLY THE WEIGHTS (and LR "
               f"schedule, step, data position) are restored; the AdamW8bit moments restart "
               f"from zero. Resume on {meta['world_size']} ranks to keep them.")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        if self.is_main:
            print(f"[framer_dist] WARNING: {msg}", flush=True)
        sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG)
        sd = {strip_wrapper_prefixes(k): v for k, v in sd.items()}
        import deepspeed

        module = self.engine.module
        with torch.no_grad():
            for n, p in module.named_parameters():
                key = strip_wrapper_prefixes(n)
                if key not in sd:
                    continue
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0,
                                                       enabled=self.stage == 3):
                    if self.is_main or self.stage != 3:
                        p.data.copy_(sd[key].to(p.dtype))
        self.engine.optimizer.refresh_fp32_params()  # from the (e.g. bf16) module weights
        self._set_fp32_masters(sd)  # then the trained ones exactly, not rounded to bf16
        common = load_torch(self._mp_rank_file(path))
        if common.get("lr_scheduler") is not None and self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.load_state_dict(common["lr_scheduler"])
        self.engine.global_steps = common.get("global_steps", 0)
        return {"optimizer_step": common.get("optimizer_step", 0)}

    @torch.no_grad()
    def _set_fp32_masters(self, sd: dict[str, Tensor]) -> None:
        """Write the checkpoint's fp32 values into the optimizer's fp32 masters of the trainable
        parameters (ZeRO-3: this rank's end-padded partition; ZeRO-1/2 and bf16: the fragment
        DeepSpeed maps to this rank; fp32 without ZeRO: the parameter is its own master)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        names = set(self.trainable_names)
        for n, p in self.engine.module.named_parameters():
            key = strip_wrapper_prefixes(n)
            if n not in names or key not in sd:
                continue
            full = sd[key].float().reshape(-1)
            if self.stage == 3:
                part = p.ds_tensor.numel()
                full = torch.nn.functional.pad(full, (0, part * self.world_size - full.numel()))
                safe_set_local_fp32_param(p, full[self.rank * part:(self.rank + 1) * part].clone())
            else:
                safe_set_full_fp32_param(p, full.view(p.shape))

    @staticmethod
    def _mp_rank_file(path: Path) -> Path:
        files = sorted((path / TAG).glob("*mp_rank_00_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{path / TAG} has no mp_rank_00 model states file")
        return files[0]

    # -- export --------------------------------------------------------------------------------
    def full_trainable_state_dict(self) -> dict[str, Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        names = set(self.trainable_names)
        out: dict[str, Tensor] = {}
        for n, p in self.engine.module.named_parameters():
            if n in names:
                full = safe_get_full_fp32_param(p)  # collective under ZeRO-3
                if self.is_main:
                    out[strip_wrapper_prefixes(n)] = full.detach().float().cpu().clone()
        return out

    def full_state_dict(self) -> dict[str, Tensor]:
        import deepspeed

        out = self.full_trainable_state_dict()  # fp32 masters of the trainable ones
        names = set(self.trainable_names)       # same on every rank: the collectives line up
        module = self.engine.module
        for n, p in module.named_parameters():
            key = strip_wrapper_prefixes(n)
            if n in names:
                continue
            with deepspeed.zero.GatheredParameters([p], enabled=self.stage == 3):
                if self.is_main:
                    out[key] = p.detach().cpu().clone()
        if self.is_main:
            for n, b in module.named_buffers():
                out[strip_wrapper_prefixes(n)] = b.detach().cpu().clone()
        return out if self.is_main else {}

    def ema_state_dict(self) -> dict[str, Tensor]:
        return {} if self.ema is None else self.ema.full()


class _DSEma:
    """EMA of the trainable parameters under DeepSpeed.

    ZeRO-3: each rank averages its own fp32 master partition (safe_get_local_fp32_param), saved
    per rank; a world-size change re-slices the concatenated partitions (ZeRO-3 splits every
    flattened parameter into equal, end-padded chunks in rank order). ZeRO-0/1/2: the module
    weights are full on every rank after the step; they are averaged in fp32 (in bf16 runs the
    source is the bf16 copy of the weights) and rank 0 saves them.
    """

    def __init__(self, be: "DeepSpeedBackend", decay: float) -> None:
        self.be, self.decay = be, decay
        names = set(be.trainable_names)
        self.params = [(n, p) for n, p in be.engine.module.named_parameters() if n in names]
        self.z3 = be.stage == 3
        self.shadow = {n: self._source(p).detach().float().clone() for n, p in self.params}

    def _source(self, p: nn.Parameter) -> Tensor:
        if self.z3:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p).reshape(-1)
        return p.data

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params:
            self.shadow[n].lerp_(self._source(p).float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def save(self, path: Path) -> None:
        if self.z3:
            torch.save({n: t.cpu() for n, t in self.shadow.items()}, path / f"ema_rank{self.be.rank:05d}.pt")
        elif self.be.is_main:
            torch.save({n: t.cpu() for n, t in self.shadow.items()}, path / "ema_full.pt")

    @torch.no_grad()
    def load(self, path: Path, meta: dict[str, Any]) -> None:
        old_world = meta["world_size"]
        if not (path / "ema_full.pt").is_file() and not (path / "ema_rank00000.pt").is_file():
            if self.be.is_main:
                print(f"[framer_dist] WARNING: {path} has no EMA state; EMA restarts from the weights")
            self.shadow = {n: self._source(p).detach().float().clone() for n, p in self.params}
            return
        if (path / "ema_full.pt").is_file():
            full = load_torch(path / "ema_full.pt")
        elif old_world == self.be.world_size and self.z3:
            own = load_torch(path / f"ema_rank{self.be.rank:05d}.pt")
            for n, t in self.shadow.items():
                t.copy_(own[n])
            return
        else:
            parts = [load_torch(path / f"ema_rank{r:05d}.pt")
                     for r in range(old_world)]
            full = {n: torch.cat([pt[n] for pt in parts]) for n in parts[0]}
        for n, p in self.params:
            flat = full[n].reshape(-1)
            if self.z3:
                numel = int(p.ds_numel)
                part = self.shadow[n].numel()
                flat = torch.nn.functional.pad(flat[:numel], (0, part * self.be.world_size - numel))
                self.shadow[n].copy_(flat[self.be.rank * part:(self.be.rank + 1) * part])
            else:
                self.shadow[n].copy_(flat[:p.numel()].view_as(self.shadow[n]))

    def full(self) -> dict[str, Tensor]:
        """Full EMA tensors on rank 0 (collective under ZeRO-3)."""
        import torch.distributed as dist

        out: dict[str, Tensor] = {}
        for n, p in self.params:
            t = self.shadow[n]
            if self.z3 and self.be.world_size > 1:
                parts = [torch.empty_like(t) for _ in range(self.be.world_size)]
                dist.all_gather(parts, t.contiguous())
                t = torch.cat(parts)
            if self.be.is_main:
                shape = p.ds_shape if self.z3 else p.shape
                out[strip_wrapper_prefixes(n)] = t[: int(torch.Size(shape).numel())].reshape(shape).cpu().clone()
        return out
