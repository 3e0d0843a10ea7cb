"""The Backend base class every backend derives from (collectives, autocast, the shared
optimizer step) and the checkpoint metadata (``backend_meta.json``) that says which backend,
optimizer, training mode and model family can load a checkpoint."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
import torch.distributed as dist
from torch import Tensor, nn

from framer_dist.config import Config, ParallelConfig, TrainConfig
from framer_dist.log import get_logger
from framer_dist.parallel.ema import EMA, Source
from framer_dist.parallel.names import trainable_names
from framer_dist.parallel.optim import resolve_grad_accum
from framer_dist.parallel.process_group import join_process_group
from framer_dist.safe_load import FORMAT_VERSION, load_torch

CLIENT_STATE_FILE = "client_state.pt"
META_FILE = "backend_meta.json"


@dataclass(frozen=True)
class BackendConfig:
    """What a backend reads of the run's configuration, taken from it in one place
    (:meth:`from_config`, by ``setup_backend`` and ``check_backend``)."""

    train: TrainConfig        # optimizer, LR schedule, precision, clipping, EMA, device, mode
    parallel: ParallelConfig  # DeepSpeed JSON, FSDP2 resharding, ZeRO-3 persistent head
    micro_batch: int          # data.batch_size: with the world size, the micro-batches per step
    family: str               # model.family, recorded in the checkpoint metadata

    @classmethod
    def from_config(cls, cfg: Config) -> "BackendConfig":
        return cls(train=cfg.train, parallel=cfg.parallel, micro_batch=cfg.data.batch_size,
                   family=cfg.model.family)


def meta_mismatch(meta: dict[str, Any], path: str | Path, backend: str, optimizer: str,
                  mode: str | None = None, family: str | None = None) -> str | None:
    """Why a checkpoint with backend meta ``meta`` cannot be loaded by ``backend`` with
    ``optimizer`` state for training mode ``mode`` of model family ``family`` (``None`` when it
    can): the layout version, the family, the backends' file layouts, the optimizers' state and
    the modes' trainable sets differ. Checked up front by ``preflight.check_paths`` and again by
    ``Backend.load``. (Checkpoints from before the mode was recorded skip that check; those from
    before the family was recorded are ``dit4sr``, the only family then.)"""
    fmt = meta.get("format", 1)  # written before the version was recorded: the same layout
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        return (f"checkpoint {path} has layout version {fmt!r} (backend_meta.json 'format'); this "
                f"framer_dist reads versions up to {FORMAT_VERSION}: resume it with the newer "
                "framer_dist that wrote it")
    if family is not None and meta.get("family", "dit4sr") != family:
        return (f"checkpoint {path} holds a {meta.get('family', 'dit4sr')!r} model, this run "
                f"trains model.family={family!r}")
    if meta.get("backend") != backend:
        return (f"checkpoint {path} was written by the {meta.get('backend')!r} backend; it cannot "
                f"be loaded with parallel.backend={backend!r}")
    if meta.get("optimizer") != optimizer:
        return (f"checkpoint {path} holds {meta.get('optimizer')!r} optimizer state but "
                f"train.optimizer is {optimizer!r}")
    if mode is not None and meta.get("mode", mode) != mode:
        return (f"checkpoint {path} trained train.mode={meta['mode']!r}, this run trains "
                f"{mode!r}: a resume continues the same trainable set (to start a {mode!r} run "
                f"from it, export its weights and use them as model.pretrained)")
    return None


class Backend:
    """Data-parallel backend. See docs/interfaces.md for the contract and docs/distributed.md."""

    name = "base"

    def __init__(self, cfg: BackendConfig, model: nn.Module, rank: int, world_size: int,
                 local_rank: int, device: torch.device) -> None:
        self.cfg = cfg
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.is_main = rank == 0
        self.grad_accum = resolve_grad_accum(cfg.train, cfg.micro_batch, world_size)
        self.compute_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.ema: EMA | None = None
        self.optimizer_step = 0  # optimizer steps taken (restored by load)

    @classmethod
    def _join(cls, cfg: BackendConfig, model: nn.Module, params: list[nn.Parameter]) -> Self:
        """A distributed backend's start: the trainable set is remembered by name (sharding
        replaces or partitions the parameter objects; checked before joining), then this rank
        joins the launcher's process group on its device."""
        trainable = list(trainable_names(model, params).values())
        device, rank, world, local_rank = join_process_group(cls.name, cfg.train)
        self = cls(cfg, model, rank, world, local_rank, device)
        self.trainable_names = trainable
        return self

    # -- collectives ---------------------------------------------------------------------------
    @property
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1

    @torch.no_grad()
    def gather(self, t: Tensor) -> Tensor:
        """All ranks' `t` concatenated on dim 0 in rank order (no gradient). Collective: every rank
        must call it with the same shape, every step."""
        t = t.detach()
        if not self._distributed:
            return t
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return torch.cat(out, dim=0)

    def agree(self, flag: bool) -> bool:
        """True when any rank passes True (all-reduce MAX). Collective."""
        if not self._distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self._distributed:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # -- precision -----------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass: bf16 autocast when train.precision='bf16' (fp32 inputs and
        fp32 buffers then meet bf16 weights safely on every backend), nothing in fp32."""
        if self.compute_dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- to implement --------------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        raise NotImplementedError

    def step(self) -> float:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    def save(self, path: str | Path, client_state: dict[str, Any]) -> None:
        raise NotImplementedError

    def load(self, path: str | Path) -> dict[str, Any]:
        raise NotImplementedError

    def full_trainable_state_dict(self) -> dict[str, Tensor]:
        """Full (unsharded, fp32, CPU) trainable parameters on rank 0, {} elsewhere. Collective."""
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, Tensor]:
        """Every parameter and buffer, full, on rank 0 ({} elsewhere). Collective."""
        raise NotImplementedError

    def ema_state_dict(self) -> dict[str, Tensor]:
        """Full EMA tensors on rank 0 ({} elsewhere, or when train.ema is off). Collective."""
        return {} if self.ema is None else self._full_ema(self.ema.state_dict())

    # -- the EMA, the same on every backend ----------------------------------------------------
    def _make_ema(self, source: Source) -> None:
        """train.ema: average what ``source()`` yields (the trainable tensors as this backend
        owns them; see :class:`EMA`)."""
        if self.cfg.train.ema:
            self.ema = EMA(source, self.cfg.train.ema_decay)

    def _restart_ema(self, path: Path) -> None:
        """A checkpoint without EMA state (written with train.ema off): start from the weights."""
        if self.is_main:
            get_logger().warning(f"{path} has no EMA state; EMA restarts from the weights")
        self.ema.reset()

    def _full_ema(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """The EMA's ``state_dict()`` as full CPU tensors on rank 0 ({} elsewhere). Collective."""
        raise NotImplementedError

    # -- shared save helpers -------------------------------------------------------------------
    def _write_meta(self, path: Path, client_state: dict[str, Any], extra: dict[str, Any]) -> None:
        """Rank 0 writes the client state and a small JSON describing the layout."""
        if self.is_main:
            torch.save(client_state, path / CLIENT_STATE_FILE)
            meta = {"format": FORMAT_VERSION, "family": self.cfg.family,
                    "backend": self.name, "world_size": self.world_size,
                    "mode": self.cfg.train.mode, **extra}
            (path / META_FILE).write_text(json.dumps(meta, indent=1))

    @staticmethod
    def read_meta(path: str | Path) -> dict[str, Any]:
        f = Path(path) / META_FILE
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: {path} is not a framer_dist checkpoint")
        return json.loads(f.read_text())

    def _check_meta(self, path: Path) -> dict[str, Any]:
        """The checkpoint's layout must fit this run: same backend, same optimizer state kind."""
        meta = self.read_meta(path)
        problem = meta_mismatch(meta, path, self.name, self.cfg.train.optimizer, self.cfg.train.mode,
                                self.cfg.family)
        if problem:
            raise RuntimeError(problem)
        return meta

    # -- shared optimizer step -----------------------------------------------------------------
    def _clip_and_step(self) -> float:
        """Clip the global grad norm (train.grad_clip, 0 = off), step optimizer and schedule, zero
        the grads, update the EMA. Needs ``params``, ``optimizer`` and ``scheduler`` from the
        subclass. Returns the pre-clip global norm."""
        clip = self.cfg.train.grad_clip
        # GPUs: one multi-tensor norm instead of a kernel per parameter (hundreds per step);
        # CPU: the per-parameter arithmetic, the same on every backend for the parity tests
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"),
                                              foreach=self.device.type == "cuda")
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.optimizer_step += 1
        return float(norm)

    @staticmethod
    def _read_client_state(path: Path) -> dict[str, Any]:
        return load_torch(path / CLIENT_STATE_FILE)
