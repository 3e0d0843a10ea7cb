"""The `deepspeed` backend: ZeRO-2/3 with a client optimizer (torch AdamW or bitsandbytes 8-bit).

The engine is built from :func:`~framer_dist.parallel.deepspeed.config.build_ds_config`; ZeRO-3's
fetch units are set up by :mod:`~framer_dist.parallel.deepspeed.units`. Checkpoints are
DeepSpeed's own (tag ``ds``) inside our checkpoint directory; a world-size change goes through
DeepSpeed's universal conversion (8-bit optimizer state: weights only).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from framer_dist.log import get_logger
from framer_dist.parallel.base import Backend, BackendConfig
from framer_dist.parallel.blocks import block_classes
from framer_dist.parallel.deepspeed.config import build_ds_config
from framer_dist.parallel.deepspeed.ema import ZeroEMALayout
from framer_dist.parallel.deepspeed.units import guard_leaf_inputs, persist_modules
from framer_dist.parallel.names import strip_wrapper_prefixes
from framer_dist.parallel.optim import build_optimizer, lr_lambda, no_decay_prefixes
from framer_dist.safe_load import load_torch, safe_torch_loads

TAG = "ds"                # DeepSpeed tag directory inside our checkpoint directory
UNIVERSAL = "ds_universal"  # universal conversion, created on demand for a world-size change


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


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    @classmethod
    def create(cls, cfg: BackendConfig, model: nn.Module, params: list[nn.Parameter]) -> "DeepSpeedBackend":
        self = cls._join(cfg, model, params)
        if self.device.type == "cpu":
            _skip_cpu_shm_op()
        quiet_deprecated_collectives()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
        self.ds_config = build_ds_config(cfg, self.grad_accum, self.world_size, block_classes(model))
        self.stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        optimizer = build_optimizer(cfg.train, params, self.trainable_names, no_decay_prefixes(model))
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)))
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
        self._ema_layout = ZeroEMALayout(engine.module, self.trainable_names, self.stage,
                                         self.rank, self.world_size)
        self._make_ema(self._ema_layout.source)
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
                get_logger().warning(f"DeepSpeed skipped an optimizer step (gradient norm {norm}); "
                                     "weights, LR schedule and EMA unchanged")
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
            self._ema_layout.save(self.ema, path)
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
        if self.ema is not None and not self._ema_layout.load(self.ema, path, meta["world_size"]):
            self._restart_ema(path)
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
            get_logger().info(f"checkpoint {path} was written on {meta['world_size']} ranks, "
                              f"resuming on {self.world_size}: converting it to a DeepSpeed "
                              "universal checkpoint")
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
            get_logger().warning(msg)
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

    def _full_ema(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._ema_layout.full(sd)

