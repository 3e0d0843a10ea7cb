"""The `none` backend: one process, no sharding (CPU or one GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from framer_dist.parallel.base import Backend, BackendConfig
from framer_dist.parallel.names import trainable_names
from framer_dist.parallel.optim import build_optimizer, lr_lambda, no_decay_prefixes
from framer_dist.safe_load import load_torch

STATE_FILE = "single_state.pt"


class SingleBackend(Backend):
    name = "none"

    def __init__(self, cfg: BackendConfig, model: nn.Module, params: list[nn.Parameter],
                 device: torch.device) -> None:
        super().__init__(cfg, model.to(device), rank=0, world_size=1, local_rank=0, device=device)
        self.frozen_bf16_numel = 0
        if cfg.train.frozen_bf16 and self.compute_dtype == torch.bfloat16:
            self.frozen_bf16_numel = cast_frozen_layers(model, torch.bfloat16)
        self.params = list(params)
        self.names = trainable_names(model, self.params)
        self.optimizer = build_optimizer(cfg.train, self.params, [self.names[id(p)] for p in self.params],
                                         no_decay_prefixes(model))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.train))
        self._make_ema(self._named_trainable)

    def _named_trainable(self):
        return ((self.names[id(p)], p) for p in self.params)

    def backward(self, loss: Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> float:
        return self._clip_and_step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, path: str | Path, client_state: dict[str, Any]) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "model": {n: p.detach() for n, p in self._named_trainable()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer_step": self.optimizer_step,
        }
        torch.save(state, path / STATE_FILE)
        self._write_meta(path, client_state, {"optimizer": self.cfg.train.optimizer})

    def load(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        self._check_meta(path)
        state = load_torch(path / STATE_FILE, map_location=self.device)
        by_name = dict(self._named_trainable())
        missing = set(by_name) - set(state["model"])
        if missing:
            raise KeyError(f"checkpoint {path} lacks trainable parameters {sorted(missing)[:5]}")
        with torch.no_grad():
            for n, p in by_name.items():
                p.copy_(state["model"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                self._restart_ema(path)
            else:
                self.ema.load_state_dict(state["ema"])
        self.optimizer_step = state["optimizer_step"]
        return self._read_client_state(path)

    def full_trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in self._named_trainable()}

    def full_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _full_ema(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.cpu().clone() for k, v in sd.items()}


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
