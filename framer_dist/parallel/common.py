"""What every backend shares: process-group setup, the Backend base class, LR schedules, EMA.

Backend-specific code (DeepSpeed, FSDP2) lives in its own module; this one only needs torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from framer_dist.config import Config, ConfigError
from framer_dist.safe_load import FORMAT_VERSION, load_torch

CLIENT_STATE_FILE = "client_state.pt"
META_FILE = "backend_meta.json"


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


# ----------------------------------------------------------------------------------------------
# process group


def resolve_device(cfg: Config, local_rank: int) -> torch.device:
    """train.device: 'auto' -> cuda:<local_rank> if CUDA is there, else cpu."""
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("config key 'train.device': 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def local_rank_from_env(argv: list[str] | None = None) -> int:
    """LOCAL_RANK from the env (torchrun, deepspeed launcher), else a `--local_rank N` argument."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    argv = sys.argv if argv is None else argv
    for i, a in enumerate(argv):
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            return int(a.split("=", 1)[1])
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            return int(argv[i + 1])
    return 0


def launcher_problem(backend_name: str, env: dict[str, str] | None = None) -> str | None:
    """Why the launcher's environment does not fit ``parallel.backend`` (None when it does): a
    distributed backend needs torchrun's / deepspeed's variables, ``none`` is one process. The one
    check of the launch, used up front (``preflight``), by ``setup_backend`` and before joining
    the process group."""
    env = os.environ if env is None else env
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if backend_name != "none" and missing:
        return (f"config key 'parallel.backend': {backend_name!r} needs a distributed launcher, "
                f"but {', '.join(missing)} are not set: start it with `torchrun --nproc-per-node N "
                "framer_dist/train.py ...` or `deepspeed framer_dist/train.py ...` (one process is "
                "fine), or use --backend none for a plain single process")
    world = int(env.get("WORLD_SIZE", "1"))
    if backend_name == "none" and world > 1:
        return (f"config key 'parallel.backend': 'none' is single-process, but this was launched "
                f"with WORLD_SIZE={world}; use --backend fsdp2 or --ds JSON")
    return None


def init_process_group(backend_name: str, device_type: str) -> tuple[int, int, int]:
    """Join (or reuse) the default process group from launcher env vars; returns (rank, world, local_rank).

    gloo on CPU, nccl on CUDA. A distributed backend launched without the env gets a clear error
    instead of DeepSpeed's mpi4py traceback or a hang.
    """
    local_rank = local_rank_from_env()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    problem = launcher_problem(backend_name)
    if problem:
        raise ConfigError(problem)
    pg_backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(pg_backend, timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), local_rank


def trainable_names(model: nn.Module, params: list[nn.Parameter]) -> dict[int, str]:
    """``id(param) -> name`` (model order) for the parameters a backend will train; an empty list or
    a parameter the model does not own is an error."""
    if not params:
        raise ValueError("no trainable parameters were passed to the backend (check train.mode)")
    ids = {id(p) for p in params}
    names = {id(p): n for n, p in model.named_parameters() if id(p) in ids}
    if len(names) != len(params):
        raise ValueError("some trainable parameters passed to setup_backend are not parameters "
                         "of the model")
    return names


# ----------------------------------------------------------------------------------------------
# schedules, accumulation, activation checkpointing


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Multiplier of train.lr after `step` optimizer steps (LambdaLR convention)."""
    t = cfg.train
    warm, total, floor = t.warmup_steps, t.steps, t.min_lr_ratio

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def resolve_grad_accum(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step. With train.global_batch_size > 0 the global batch is kept
    constant across world sizes: grad_accum = global / (micro * world), which must divide evenly."""
    gbs = cfg.train.global_batch_size
    if gbs <= 0:
        return cfg.train.grad_accum
    micro = cfg.data.batch_size
    per_step = micro * world_size
    if gbs % per_step:
        raise ConfigError(
            f"config key 'train.global_batch_size': {gbs} is not divisible by data.batch_size "
            f"({micro}) x world size ({world_size}) = {per_step}; pick a global batch that is a "
            f"multiple of {per_step} or change data.batch_size")
    return gbs // per_step


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (FSDP2 units, AC and compile targets): `transformer_blocks` or `blocks`."""
    for attr in ("transformer_blocks", "blocks"):
        blocks = getattr(model, attr, None)
        if isinstance(blocks, (nn.ModuleList, list, tuple)) and len(blocks) > 0:
            return list(blocks)
    return []


def ac_indices(cfg: Config, num_blocks: int) -> list[int]:
    """Which blocks recompute activations in backward, from parallel.activation_checkpointing."""
    p = cfg.parallel
    if p.activation_checkpointing == "none":
        return []
    if p.activation_checkpointing == "all":
        return list(range(num_blocks))
    if p.activation_checkpointing == "every_k":
        return list(range(0, num_blocks, p.ac_every_k))
    bad = [i for i in p.ac_blocks if not -num_blocks <= i < num_blocks]
    if bad:
        raise ConfigError(f"config key 'parallel.ac_blocks': indices {bad} are out of range for a "
                          f"model with {num_blocks} blocks")
    return sorted({i % num_blocks for i in p.ac_blocks})


def apply_activation_checkpointing(cfg: Config, model: nn.Module) -> list[int]:
    """Ask the model to checkpoint the chosen blocks (its own non-reentrant route, which keeps
    module names unchanged, unlike torch's checkpoint_wrapper)."""
    blocks = transformer_blocks(model)
    idx = ac_indices(cfg, getattr(model, "num_blocks", len(blocks)))
    if idx:
        if not hasattr(model, "set_activation_checkpointing"):
            raise ConfigError("config key 'parallel.activation_checkpointing': the model has no "
                              "set_activation_checkpointing(indices) method")
        model.set_activation_checkpointing(idx)
    return idx


def strip_wrapper_prefixes(name: str) -> str:
    """Remove names added by wrappers (checkpoint_wrapper, torch.compile, DDP) from a parameter name."""
    name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    return name[len("module."):] if name.startswith("module.") else name


# ----------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of the trainable parameters, kept in fp32.

    The averaged tensors have the same kind as the parameters the backend owns: full tensors
    (none, ZeRO-2), DTensor shards (FSDP2: DCP saves and reshards them like the model).
    """

    def __init__(self, named: Iterable[tuple[str, Tensor]], decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, Tensor] = {n: t.detach().float().clone() for n, t in named}

    @torch.no_grad()
    def update(self, named: Iterable[tuple[str, Tensor]]) -> None:
        for n, t in named:
            self.shadow[n].lerp_(t.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(sd)
        if missing:
            raise KeyError(f"EMA state in the checkpoint lacks {sorted(missing)[:5]}")
        for n, t in self.shadow.items():
            t.copy_(sd[n])


def cast_frozen_layers(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the weights of every Linear and Conv layer none of whose own parameters train to
    ``dtype``; returns how many parameter elements were cast. Under autocast to ``dtype`` these
    layers cast their weights at every use (frozen weights are not in autocast's cast cache), so
    holding them in ``dtype`` gives the same bits with less memory and no casts. Norms and every
    other frozen parameter keep their dtype (autocast runs norms in fp32, where a rounded weight
    would change results)."""
    cast = 0
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and own and not any(p.requires_grad for p in own):
            m.to(dtype)
            cast += sum(p.numel() for p in own)
    return cast


# ----------------------------------------------------------------------------------------------
# the base class


class Backend:
    """Data-parallel backend. See docs/interfaces.md for the contract and docs/distributed.md."""

    name = "base"

    def __init__(self, cfg: Config, model: nn.Module, rank: int, world_size: int,
                 local_rank: int, device: torch.device) -> None:
        self.cfg = cfg
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.is_main = rank == 0
        self.grad_accum = resolve_grad_accum(cfg, world_size)
        self.compute_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.ema: EMA | None = None
        self.optimizer_step = 0  # optimizer steps taken (restored by load)

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
        return {}

    # -- shared save helpers -------------------------------------------------------------------
    def _write_meta(self, path: Path, client_state: dict[str, Any], extra: dict[str, Any]) -> None:
        """Rank 0 writes the client state and a small JSON describing the layout."""
        if self.is_main:
            torch.save(client_state, path / CLIENT_STATE_FILE)
            meta = {"format": FORMAT_VERSION, "family": self.cfg.model.family,
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
                                self.cfg.model.family)
        if problem:
            raise RuntimeError(problem)
        return meta

    # -- shared optimizer step -----------------------------------------------------------------
    def _clip_and_step(self) -> float:
        """Clip the global grad norm (train.grad_clip, 0 = off), step optimizer and schedule, zero
        the grads, update the EMA. Needs ``params``, ``optimizer``, ``scheduler`` and
        ``_named_trainable`` from the subclass. Returns the pre-clip global norm."""
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
            self.ema.update(self._named_trainable())
        self.optimizer_step += 1
        return float(norm)

    @staticmethod
    def _read_client_state(path: Path) -> dict[str, Any]:
        return load_torch(path / CLIENT_STATE_FILE)
