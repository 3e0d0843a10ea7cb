"""The `fsdp2` backend: `fully_shard` per transformer block, then the root; DCP checkpoints.

Mixed precision: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) when train.precision
is bf16 (the root without ``cast_forward_inputs``, so the timestep stays fp32); the sharded
parameters (what the optimizer updates) stay fp32. Checkpoints are
torch.distributed.checkpoint (DCP) directories, which reshard on load: any world size resumes.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from framer_dist.config import ConfigError
from framer_dist.parallel.base import Backend, BackendConfig
from framer_dist.parallel.blocks import transformer_blocks
from framer_dist.parallel.names import strip_wrapper_prefixes
from framer_dist.parallel.optim import build_optimizer, lr_lambda, no_decay_prefixes, optimizer_kwargs
from framer_dist.safe_load import dcp_load, load_torch, read_dcp_metadata

DCP_DIR = "dcp"


class FSDP2Backend(Backend):
    name = "fsdp2"

    @classmethod
    def create(cls, cfg: BackendConfig, model: nn.Module, params: list[nn.Parameter]) -> "FSDP2Backend":
        self = cls._join(cfg, model, params)
        device, world = self.device, self.world_size
        blocks = transformer_blocks(model)
        if not blocks:
            raise ConfigError("parallel.backend='fsdp2' shards per transformer block, but the model "
                              "has no non-empty `transformer_blocks` (or `blocks`) attribute")
        model.to(device)
        self.mesh = init_device_mesh(device.type, (world,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cfg.train.precision == "bf16" else MixedPrecisionPolicy())
        reshard = cfg.parallel.reshard_after_forward
        for b in blocks:  # already compiled in place by setup_backend when parallel.compile
            fully_shard(b, mesh=self.mesh, mp_policy=mp, reshard_after_forward=reshard)
        # The root keeps its parameters (embedders, the output head) unsharded until the end of
        # backward: the FRAMER readout calls the head inside every block's checkpointed region, so
        # activation-checkpoint recomputation needs them after the root's forward has returned
        # (with resharding, recomputation read freed storage on an H100).
        # The root does not cast its inputs: the timestep (sigma * 1000) must stay fp32 as on the
        # other backends and at inference (bf16 rounds it to a multiple of 4 above 512); the
        # model's forward casts the latents and embeddings to the (bf16) weight dtype itself.
        fully_shard(model, mesh=self.mesh, mp_policy=dataclasses.replace(mp, cast_forward_inputs=False),
                    reshard_after_forward=False)
        by_name = dict(model.named_parameters())
        self.params = [by_name[n] for n in self.trainable_names]
        if cfg.train.optimizer == "adamw8bit":
            from framer_dist.parallel.bnb_shards import ShardedAdamW8bit

            self.optimizer = ShardedAdamW8bit(list(zip(self.trainable_names, self.params)),
                                              no_decay=no_decay_prefixes(model),
                                              **optimizer_kwargs(cfg.train))
            sched_target = self.optimizer.opt
        else:
            self.optimizer = build_optimizer(cfg.train, self.params, self.trainable_names,
                                             no_decay_prefixes(model))
            sched_target = self.optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(sched_target, lr_lambda(cfg.train))
        self._make_ema(self._named_trainable)
        self._micro = 0
        return self

    def _named_trainable(self):
        return zip(self.trainable_names, self.params)

    @property
    def _fsdp_root(self) -> FSDPModule:
        return self.model  # type: ignore[return-value]

    # -- training ------------------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        self._micro += 1
        # reduce-scatter only on the last micro-batch of the step
        self._fsdp_root.set_requires_gradient_sync(self._micro >= self.grad_accum)
        (loss / self.grad_accum).backward()

    def step(self) -> float:
        if self._micro != self.grad_accum:
            raise RuntimeError(f"step() after {self._micro} backward() calls; expected "
                               f"{self.grad_accum} (grad_accum)")
        self._micro = 0
        return self._clip_and_step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """The DCP state: trainable params, optimizer, EMA (frozen weights come from the pretrained
        files, so they are not written every time)."""
        names = set(self.trainable_names)
        msd = get_model_state_dict(self.model)
        state: dict[str, Any] = {"model": {k: v for k, v in msd.items() if k in names}}
        if self.cfg.train.optimizer == "adamw8bit":
            state["optim8"] = self.optimizer.dcp_state()
        else:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save(self, path: str | Path, client_state: dict[str, Any]) -> None:
        path = Path(path)
        dcp.save(self._state(), checkpoint_id=str(path / DCP_DIR))
        if self.cfg.train.optimizer == "adamw8bit":
            torch.save(self.optimizer.raw_state(), path / f"optim8_rank{self.rank:05d}.pt")
        if self.is_main:
            torch.save({"scheduler": self.scheduler.state_dict(),
                        "optimizer_step": self.optimizer_step}, path / "fsdp_extra.pt")
        self._write_meta(path, client_state, {"optimizer": self.cfg.train.optimizer})

    def load(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        meta = self._check_meta(path)
        state = self._state()  # templates with the current sharding: DCP reshards into them
        if self.ema is not None and not _has_key(path / DCP_DIR, "ema"):
            state.pop("ema")
        dcp_load(state, path / DCP_DIR)
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=False))
        if "optim8" in state:
            raw = path / f"optim8_rank{self.rank:05d}.pt"
            if meta["world_size"] == self.world_size and raw.is_file():
                self.optimizer.load_raw_state(load_torch(raw))
            else:
                self.optimizer.load_dcp_state(state["optim8"])  # resharded, re-quantised
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # after the weights were loaded: the EMA restarts from them
                self._restart_ema(path)
        extra = load_torch(path / "fsdp_extra.pt")
        self.scheduler.load_state_dict(extra["scheduler"])
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            g["lr"] = lr  # LambdaLR.load_state_dict does not touch the groups
        self.optimizer_step = int(extra["optimizer_step"])
        return self._read_client_state(path)

    # -- export --------------------------------------------------------------------------------
    def _full(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for k, v in sd.items():
            full = v.full_tensor() if isinstance(v, DTensor) else v  # collective per DTensor
            if self.is_main:
                out[strip_wrapper_prefixes(k)] = full.detach().cpu().clone()
        return out

    def full_trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v.float() for k, v in self._full(dict(self._named_trainable())).items()}

    def full_state_dict(self) -> dict[str, Tensor]:
        return self._full(get_model_state_dict(self.model))

    def _full_ema(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._full(sd)


def _has_key(dcp_dir: Path, prefix: str) -> bool:
    """Whether a DCP checkpoint holds entries under `prefix` (reads only its metadata)."""
    md = read_dcp_metadata(dcp_dir / ".metadata")
    return any(k == prefix or k.startswith(prefix + ".") for k in md.state_dict_metadata)
