"""Pre-flight: everything a run needs, checked before any process group or model exists, so a
mistake is one line naming the config key (``framer-train: error: ...``, exit 2) instead of a
traceback from a rank. ``check_paths`` is called by the trainer's entry point and by the
submitters (on a login node, without the launcher and CUDA checks)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from framer_dist.config import Config, ConfigError


def need_path(key: str, value: str, kind: str) -> None:
    """Config key ``key`` names a ``kind`` ('dir', 'file' or 'any') that exists (unset is fine);
    families check their own paths with it in ``ModelFamily.check``."""
    if not value:
        return
    p = Path(value)
    ok = p.is_dir() if kind == "dir" else p.is_file() if kind == "file" else p.exists()
    if not ok:
        what = {"dir": "folder", "file": "file"}.get(kind, "path")
        raise ConfigError(f"config key '{key}': {what} not found: {value}")


def check_paths(cfg: Config, world_size: int | None = None, on_this_machine: bool = True) -> None:
    """Every file and folder the run needs, checked before any process group or model exists.

    ``world_size``: the launch's (default: the launcher's WORLD_SIZE, else 1).
    ``on_this_machine=False`` (a submitter on a login node) skips the launcher and CUDA checks."""

    if cfg.parallel.backend == "deepspeed":  # its contents: parallel.check_backend below
        need_path("parallel.ds_config", cfg.parallel.ds_config, "file")
    from framer_dist.models import get_family
    get_family(cfg.model.family).check(cfg)  # the family's own files (e.g. model.pretrained)
    d = cfg.data
    if d.source in ("folder", "cached"):
        need_path("data.path", d.path, "dir")
    if d.source == "cached":  # the cache's manifest against data.resolution / data.scale
        from framer_dist.data.sources import DataSourceError, check_cache_manifest
        try:
            check_cache_manifest(d.path, d.resolution, d.scale)
        except DataSourceError as e:
            raise ConfigError(str(e)) from None
    elif d.source == "webdataset" and not any(ch in d.path for ch in "{:*"):
        need_path("data.path", d.path, "any")  # brace patterns and URLs are checked by the loader
    need_path("data.prompt_embeddings", d.prompt_embeddings, "dir")
    need_path("data.captions", d.captions, "file")
    need_path("data.vae", d.vae, "dir")
    if d.vae and not any((Path(d.vae) / sub / "config.json").is_file() for sub in ("", "vae")):
        raise ConfigError(f"config key 'data.vae': no diffusers VAE (config.json) in {d.vae} "
                          "or its vae/ folder")
    for key, value in (("train.out_dir", cfg.train.out_dir), ("checkpoint.dir", cfg.checkpoint.dir),
                       ("log.dir", cfg.log.dir)):
        if value and Path(value).exists() and not Path(value).is_dir():
            raise ConfigError(f"config key '{key}': {value} exists and is not a folder")
    # The launcher already fixed the world size: the backend checks its own settings against it
    import os
    from framer_dist.parallel import check_backend
    check_backend(cfg, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")),
                  on_this_machine)
    if on_this_machine and cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device': 'cuda' requested but CUDA is not available")
    # last: the run folder's state (after every check of the config itself, which a mistake there
    # should report first)
    _check_resume_state(cfg)


def _check_resume_state(cfg: Config) -> None:
    """What checkpoint.resume finds in the run's checkpoint folder: an explicit checkpoint exists,
    a fresh run does not land on an earlier run's checkpoints, and the checkpoint a resume would
    load was written by this backend, optimizer and training mode."""
    r = cfg.checkpoint.resume
    from framer_dist.checkpoint import find_checkpoint, list_valid_checkpoints
    root = Path(cfg.checkpoint.dir or Path(cfg.train.out_dir) / "checkpoints")
    if r not in ("", "auto", "none"):
        need_path("checkpoint.resume", r, "any")  # a file: find_checkpoint says what it is
    else:
        found = list_valid_checkpoints(root) if r != "auto" else []
        if found:  # a fresh run here would mix with (and not overwrite) the earlier run's saves
            raise ConfigError(
                f"config key 'checkpoint.resume': {root} already holds checkpoints of an earlier "
                f"run (newest {found[-1].name}); continue it with --resume auto, or start afresh "
                "with another train.out_dir (or checkpoint.dir) or after removing that folder")
    try:  # the checkpoint a resume would load: it must fit this run's backend and optimizer
        resume_from = find_checkpoint(root, r)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    from framer_dist.parallel.base import META_FILE, Backend, meta_mismatch
    meta_file = resume_from / META_FILE if resume_from is not None else None
    if meta_file is not None and meta_file.exists():  # none: Backend.load reports it
        try:
            meta = Backend.read_meta(resume_from)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"config key 'checkpoint.resume': {meta_file} is not a framer_dist "
                              f"backend meta file ({e})") from None
        problem = meta_mismatch(meta, resume_from, cfg.parallel.backend, cfg.train.optimizer,
                                cfg.train.mode, cfg.model.family)
        if problem:
            was = meta.get("backend")
            if was != cfg.parallel.backend:
                hint = ("; resume it with --ds <its DeepSpeed JSON>" if was == "deepspeed" else
                        f"; resume it with --backend {was}")
            elif meta.get("optimizer") != cfg.train.optimizer:
                hint = "; resume it with train.optimizer=" + json.dumps(meta.get("optimizer"))
            else:
                hint = ""
            raise ConfigError(f"config key 'checkpoint.resume': {problem}{hint}")


def config_warnings(cfg: Config) -> list[str]:
    """Valid settings that are almost certainly not what the user meant (one line each, naming
    the key); the run goes on."""
    out = []
    if cfg.train.lr == 0:
        out.append("config key 'train.lr' is 0: every step runs, but no weight changes (the "
                   "updates and the weight decay scale with the learning rate)")
    return out
