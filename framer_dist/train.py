"""Train a model family's backbone (default: DiT4SR) with its own loss plus the FRAMER objective.

    deepspeed framer_dist/train.py --ds ds_configs/zero3.json --config configs/sd35m_framer.toml
    torchrun --nproc-per-node 8 framer_dist/train.py --backend fsdp2 --config configs/sd35m_framer.toml
    python framer_dist/train.py --config configs/tiny_cpu_demo.toml train.steps=10   # one process
    ... --resume auto | --resume runs/x/checkpoints/step_00000300

Read top to bottom: arguments -> config and path checks (before any process group) -> model,
training mode, backend, checkpoint resume, data from the global sample position -> the loop
(per micro-batch: noise, forward with the per-layer readout, noise loss + lambda * FRAMER loss,
backward; then step, log, checkpoint, preemption) -> exports. docs/training.md is the user guide.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):  # `python framer_dist/train.py` / `deepspeed framer_dist/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from framer_dist.config import Config, ConfigError, load_config

# ----------------------------------------------------------------------------------------------
# command line and up-front validation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="framer-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted config keys, e.g. framer.weight=0.05 train.steps=200.")
    p.add_argument("--config", help="run config (TOML, see configs/)")
    p.add_argument("--backend", choices=["none", "deepspeed", "fsdp2"],
                   help="data-parallel backend (sets parallel.backend)")
    p.add_argument("--ds", metavar="JSON", help="DeepSpeed config; implies --backend deepspeed")
    p.add_argument("--resume", metavar="auto|PATH", help="sets checkpoint.resume")
    p.add_argument("--out", metavar="DIR", help="sets train.out_dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK wins
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    # intermixed: overrides may sit before and after the flags (`... train.steps=2 --out d x.y=1`)
    return p.parse_intermixed_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """Config file <- dotted overrides <- the explicit flags (which win)."""
    overrides = list(args.overrides)
    if args.ds:
        overrides += [f"parallel.backend=\"{args.backend or 'deepspeed'}\"",
                      f"parallel.ds_config={json.dumps(args.ds)}"]
    elif args.backend:
        overrides.append(f"parallel.backend=\"{args.backend}\"")
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={json.dumps(args.resume)}")
    if args.out:
        overrides.append(f"train.out_dir={json.dumps(args.out)}")
    cfg = load_config(args.config, overrides)
    if args.ds and cfg.parallel.backend != "deepspeed":
        raise ConfigError(f"--ds {args.ds} was given with --backend {args.backend}: a DeepSpeed "
                          "config only applies to parallel.backend='deepspeed'")
    return cfg


def _need(key: str, value: str, kind: str) -> None:
    """Config key ``key`` names a ``kind`` ('dir', 'file' or 'any') that exists (unset is fine)."""
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

    if cfg.parallel.backend == "deepspeed":
        _need("parallel.ds_config", cfg.parallel.ds_config, "file")
        try:
            json.loads(Path(cfg.parallel.ds_config).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config key 'parallel.ds_config': {cfg.parallel.ds_config} is not "
                              f"valid JSON: {e}") from None
    from framer_dist.models import get_family
    get_family(cfg.model.family).check(cfg)  # the family's own files (e.g. model.pretrained)
    d = cfg.data
    if d.source in ("folder", "cached"):
        _need("data.path", d.path, "dir")
    if d.source == "cached":  # the cache's manifest against data.resolution / data.scale
        from framer_dist.data.sources import DataSourceError, check_cache_manifest
        try:
            check_cache_manifest(d.path, d.resolution, d.scale)
        except DataSourceError as e:
            raise ConfigError(str(e)) from None
    elif d.source == "webdataset" and not any(ch in d.path for ch in "{:*"):
        _need("data.path", d.path, "any")  # brace patterns and URLs are checked by the loader
    _need("data.prompt_embeddings", d.prompt_embeddings, "dir")
    _need("data.captions", d.captions, "file")
    _need("data.vae", d.vae, "dir")
    if d.vae and not any((Path(d.vae) / sub / "config.json").is_file() for sub in ("", "vae")):
        raise ConfigError(f"config key 'data.vae': no diffusers VAE (config.json) in {d.vae} "
                          "or its vae/ folder")
    for key, value in (("train.out_dir", cfg.train.out_dir), ("checkpoint.dir", cfg.checkpoint.dir),
                       ("log.dir", cfg.log.dir)):
        if value and Path(value).exists() and not Path(value).is_dir():
            raise ConfigError(f"config key '{key}': {value} exists and is not a folder")
    # The launcher already fixed the world size: check the global batch divides before joining.
    import os
    from framer_dist.parallel.common import resolve_grad_accum
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    accum = resolve_grad_accum(cfg, world)
    if cfg.parallel.backend == "deepspeed":  # the JSON's contents against our config
        from framer_dist.parallel.ds import build_ds_config
        build_ds_config(cfg, accum, world)
    if on_this_machine:
        _check_launcher(cfg, world)
    # last: the run folder's state (after every check of the config itself, which a mistake there
    # should report first)
    _check_resume_state(cfg)


def _check_launcher(cfg: Config, world: int) -> None:
    """The launcher's env vars and the device fit the backend (skipped by a submitter)."""
    import os
    backend = cfg.parallel.backend
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if backend != "none" and missing:
        raise ConfigError(
            f"config key 'parallel.backend': {backend!r} needs a distributed launcher, but "
            f"{', '.join(missing)} are not set: start it with `torchrun --nproc-per-node N "
            "framer_dist/train.py ...` or `deepspeed framer_dist/train.py ...` (one process is "
            "fine), or use --backend none for a plain single process")
    if backend == "none" and world > 1:
        raise ConfigError(f"config key 'parallel.backend': 'none' is single-process, but this was "
                          f"launched with WORLD_SIZE={world}; use --backend fsdp2 or --ds JSON")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device': 'cuda' requested but CUDA is not available")


def _check_resume_state(cfg: Config) -> None:
    """What checkpoint.resume finds in the run's checkpoint folder: an explicit checkpoint exists,
    a fresh run does not land on an earlier run's checkpoints, and the checkpoint a resume would
    load was written by this backend, optimizer and training mode."""
    r = cfg.checkpoint.resume
    from framer_dist.checkpoint import find_checkpoint, list_valid_checkpoints
    root = Path(cfg.checkpoint.dir or Path(cfg.train.out_dir) / "checkpoints")
    if r not in ("", "auto", "none"):
        _need("checkpoint.resume", r, "any")  # a file: find_checkpoint says what it is
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
    from framer_dist.parallel.common import META_FILE, Backend, meta_mismatch
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


# ----------------------------------------------------------------------------------------------
# small helpers of the loop


@dataclass
class RunResult:
    """What a finished (or preempted) run leaves behind; returned for tests and the demo."""

    steps_done: int
    out_dir: Path
    checkpoint: Path | None = None
    exports: dict[str, Path] = field(default_factory=dict)
    log_dir: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    preempted: bool = False
    model: Any = None            # the trained module (backend.model), for tests and the demo
    is_main: bool = True         # rank 0 (prints the closing line)


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def closing_line(result: RunResult, total_steps: int, seconds: float) -> str:
    """The one line a finished run ends with: steps, time, where the checkpoint, the exports and
    the TensorBoard logs are."""
    exports = ", ".join(f"{k} {v}" for k, v in result.exports.items()) or "none (checkpoint.export)"
    return (f"[framer_dist] done: step {result.steps_done} of {total_steps} "
            f"({len(result.history)} this run) in {_duration(seconds)}; "
            f"last checkpoint: {result.checkpoint or 'none written'}; exports: {exports}; "
            f"TensorBoard logs: {result.log_dir} (tensorboard --logdir {result.log_dir})")


def infinite_batches(cfg: Config, rank: int, world: int, start_sample: int,
                     pipelines: list | None = None, report: Any = None) -> Iterator[dict[str, Any]]:
    """Batches from the global sample position onward; a finite loader is restarted where it
    ended. Each loader built is appended to ``pipelines``; its skip/convert events go to
    ``report`` (a DataReport; default: the loader's own)."""
    from framer_dist.data import build_dataloader

    pos = start_sample
    while True:
        n = 0
        pipe = build_dataloader(cfg, rank, world, start_sample=pos, report=report)
        if pipelines is not None:
            pipelines.append(pipe)
        for batch in pipe:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(f"data.path={cfg.data.path!r}: the dataloader yielded no batch from "
                               f"sample {pos}; is the dataset smaller than one global batch?")
        # The loader ended (one pass): continue from the global position reached.
        pos += n * cfg.data.batch_size * world


class DataLines:
    """The data pipeline's report on the console. Collective: every rank calls :meth:`flush` at
    the same steps. Each rank's new example lines (``data: <kind>: <item>``) and counts are
    gathered; rank 0 prints each line once (at most ``max_examples`` per kind over all ranks),
    through ``write`` (above the progress bar), and at the end the counts summed over ranks."""

    def __init__(self, report: Any, backend: Any, write: Any) -> None:
        self.report, self.backend, self.write = report, backend, write
        self.printed: dict[str, set[str]] = {}

    def flush(self, final: bool = False) -> dict[str, int]:
        """Counts summed over ranks (every rank gets them)."""
        from collections import Counter

        import torch.distributed as dist

        from framer_dist.data.images import summary_line
        be = self.backend
        mine = (dict(self.report.counts), self.report.take_new())
        if be.world_size > 1 and dist.is_initialized():
            every: list = [None] * be.world_size
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        totals: Counter = Counter()
        for counts, _ in every:
            totals.update(counts)
        if be.is_main:
            for _, new in every:
                for kind, line in new:
                    seen = self.printed.setdefault(kind, set())
                    if line not in seen and len(seen) < self.report.max_examples:
                        seen.add(line)
                        self.write(line)
            if final and totals:
                over = f" (summed over {be.world_size} ranks)" if be.world_size > 1 else ""
                self.write(summary_line(totals) + over)
        return dict(totals)


def sample_positions(batch: dict[str, Any], step_start_sample: int, micro: int, rank: int,
                     world: int, b: int) -> list[int]:
    """Global stream positions of this micro-batch's samples (seed the per-sample noise).

    Layout of one optimizer step's global batch: micro-batch-major, then rank, then sample.
    A loader that reports indices ("index") is trusted instead.
    """
    if "index" in batch:
        return [int(i) for i in torch.as_tensor(batch["index"]).reshape(-1).tolist()]
    base = step_start_sample + (micro * world + rank) * b
    return list(range(base, base + b))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# the run


def train(cfg: Config) -> RunResult:
    """One training run (every rank calls this). Config and paths must already be validated."""
    from framer_dist import metrics
    from framer_dist.checkpoint import CheckpointManager, seed_rng
    from framer_dist.flops import peak_flops
    from framer_dist.framer import select_layers
    from framer_dist.micro_batch import micro_batch_loss
    from framer_dist.models import StepContext, get_family
    from framer_dist.parallel import setup_backend
    from framer_dist.preempt import PreemptionHandler

    t_cfg, f_cfg = cfg.train, cfg.framer
    out_dir = Path(t_cfg.out_dir)
    import os
    if os.environ.get("RANK", "0") == "0":  # once, before the model is built (the launcher's rank)
        for warning in config_warnings(cfg):
            print(f"[framer_dist] WARNING: {warning}", flush=True)
    torch.manual_seed(t_cfg.seed)  # identical initialisation of the new layers on every rank

    # -- model, trainable parameters, backend ---------------------------------------------------
    family = get_family(cfg.model.family)
    model = family.build(cfg)
    params = family.trainable(model, cfg)
    if not params:
        raise ConfigError(f"config key 'train.mode': {t_cfg.mode!r} leaves no trainable parameter")
    num_blocks = model.num_blocks
    students, teacher = select_layers(num_blocks, f_cfg) if f_cfg.enabled else ([], -1)
    count_flops = family.flops(model, cfg)  # from the plain model, before the backend shards it
    backend = setup_backend(cfg, model, params)
    rank, world, device = backend.rank, backend.world_size, backend.device
    accum = backend.grad_accum
    b_micro = cfg.data.batch_size
    global_batch = b_micro * world * accum
    logs_here = backend.is_main or cfg.log.all_ranks
    if f_cfg.enabled and f_cfg.in_batch_negatives and accum > 1 and backend.is_main:
        # InterCL's keys are gathered per forward, so accumulation shrinks its negatives
        print(f"[framer_dist] note: InterCL compares each image with the {b_micro * world} images "
              f"of one forward (data.batch_size x world size), not the global batch of "
              f"{global_batch} ({accum} accumulated micro-batches); the authors' run used one "
              "forward of 16 (docs/framer.md)", flush=True)

    # -- resume: weights, optimizer, scheduler, EMA, RNGs, step and global data position --------
    framer_gen = torch.Generator().manual_seed(t_cfg.seed)
    ckpt = CheckpointManager.from_config(cfg, backend)
    client = ckpt.resume(cfg.checkpoint.resume, generator=framer_gen, seed=t_cfg.seed,
                         required=("step", "samples_seen"))
    step = int(client["step"]) if client else 0
    samples_seen = int(client["samples_seen"]) if client else 0
    if client and backend.is_main:
        print(f"[framer_dist] resumed from {ckpt.last_loaded} at step {step} "
              f"(sample {samples_seen}, world size {world})", flush=True)

    # -- logging -------------------------------------------------------------------------------
    log_dir = Path(cfg.log.dir or out_dir / "tb")
    # after a resume at step N, TensorBoard discards what the interrupted run logged after N
    tb = metrics.TBWriter(log_dir if world == 1 or backend.is_main else log_dir / f"rank{rank}",
                          enabled=logs_here, purge_step=step + 1 if client else None)
    history_file = out_dir / "metrics.jsonl"
    if backend.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        from framer_dist.atomic import write_text_atomic
        from framer_dist.config import dump_toml
        write_text_atomic(out_dir / "config.toml", dump_toml(cfg))  # a crash keeps the old one
    flops_per_sample: float | None = None
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      t_cfg.precision)
    bar = metrics.progress_bar(t_cfg.steps, step, cfg.log.progress and backend.is_main)
    thr = metrics.Throughput()
    history: list[dict[str, float]] = []

    from framer_dist.data import DataReport
    report = DataReport(echo=False)  # printed by rank 0 for all ranks (DataLines)
    data_lines = DataLines(report, backend, lambda line: metrics.bar_print(bar, line))
    batches = infinite_batches(cfg, rank, world, samples_seen, report=report)
    vae = None
    preempt = PreemptionHandler.from_config(cfg).install()
    preempted, last_ckpt = False, None
    model_fwd = backend.model

    def save(at_step: int) -> Path:
        return ckpt.save(at_step, {"step": at_step, "samples_seen": samples_seen,
                                   "world_size": world, "config": cfg.to_dict()},
                         generator=framer_gen)

    try:
        while step < t_cfg.steps:
            # Every random stream of this step is a function of (seed, step, rank) only.
            seed_rng(t_cfg.seed, step, rank, framer_gen)
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # base, framer, total
            layer_metrics: dict[str, torch.Tensor] = {}
            checks = []  # deferred FRAMER NaN/Inf checks, run before the optimizer step
            for micro in range(accum):
                thr.data_start()
                batch = to_device(next(batches), device)
                thr.data_end()
                if "hr_latent" not in batch:  # pixels: degrade/encode online with the VAE
                    from framer_dist.data import encode_batch, load_vae
                    vae = vae or load_vae(cfg.data, device=device)
                    batch = encode_batch(vae, batch)
                positions = sample_positions(batch, samples_seen, micro, rank, world,
                                             batch["hr_latent"].shape[0])
                # the family's step (its loss, the per-block features) + lambda * FRAMER
                ctx = StepContext(cfg, positions, backend.autocast())
                losses = micro_batch_loss(family, model_fwd, batch, ctx, students, teacher,
                                          framer_gen, gather=backend.gather, rank=rank)
                backend.backward(losses.total)
                checks.append(losses.verify)
                # detached sums on the device: no host sync per micro-batch
                sums += torch.stack([losses.base.detach(), losses.framer.detach(),
                                     losses.total.detach()]).double()
                layer_metrics = losses.layer_metrics
                if flops_per_sample is None and count_flops is not None:
                    flops_per_sample = count_flops(batch)
            for check in checks:
                check()
            grad_norm = backend.step()
            step += 1
            samples_seen += global_batch
            thr.step_done(b_micro * accum)

            # Losses averaged over micro-batches and ranks (a tiny collective, every step).
            mean = backend.gather((sums / accum).reshape(1, 3)).mean(0).cpu()
            rec = {"step": step, f"loss/{family.base_loss_name}": float(mean[0]),
                   "loss/total": float(mean[2]),
                   "lr": backend.lr, "grad_norm": float(grad_norm)}
            if f_cfg.enabled:
                rec["loss/framer"] = float(mean[1])
            history.append(rec)
            if backend.is_main:
                with open(history_file, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            if step % cfg.log.every == 0 or step == t_cfg.steps:
                perf = thr.summary(flops_per_sample, peak, world)
                totals = data_lines.flush()  # collective; rank 0 prints new data lines
                # rank 0 logs the counts of all ranks, any other (log.all_ranks) its own
                data_counts = {f"data/{k}": v for k, v in
                               (totals if backend.is_main else report.as_dict()).items()}
                tb.scalars({**{k: v for k, v in rec.items() if k != "step"}, **perf,
                            "memory/peak_gb": metrics.peak_memory_gb(device), **data_counts}, step)
                thr.reset()
                bar.set_postfix(loss=f"{rec['loss/total']:.4f}", img_s=f"{perf['perf/img_per_s']:.1f}")
            if f_cfg.enabled and layer_metrics:
                if cfg.log.heatmap_every and (step % cfg.log.heatmap_every == 0 or step == 1):
                    if logs_here:
                        tb.image("framer/heatmap",
                                 metrics.heatmap_image(layer_metrics, students, step), step)
                if cfg.log.per_layer_scalars and step % cfg.log.every == 0:
                    tb.scalars(metrics.framer_layer_scalars(layer_metrics, students), step)
            if cfg.log.val_every and step % cfg.log.val_every == 0:
                validate(family, cfg, backend, batch, tb, step)
            bar.update(1)

            # Preemption: every rank learns whether any rank was signalled, then all save.
            preempted = preempt.should_stop(backend)
            every = cfg.checkpoint.every
            if preempted or (every and step % every == 0) or step == t_cfg.steps:
                last_ckpt = save(step)
            if preempted:
                if backend.is_main:
                    metrics.bar_print(bar, f"[framer_dist] preemption signal: saved {last_ckpt}; "
                                      f"exiting with code {cfg.checkpoint.requeue_exit_code} for "
                                      "requeue")
                break
        data_lines.flush(final=True)  # collective: the last lines and the summed counts
        exports = {} if preempted else export(family, cfg, backend, out_dir)
    except BaseException:
        for _, line in report.take_new():  # this rank's unprinted lines may explain the error
            print(line, file=sys.stderr, flush=True)
        raise
    finally:
        preempt.uninstall()
        bar.close()
        tb.close()
    return RunResult(steps_done=step, out_dir=out_dir, checkpoint=last_ckpt, exports=exports,
                     log_dir=log_dir, history=history, preempted=preempted,
                     model=backend.model, is_main=backend.is_main)


def export(family: Any, cfg: Config, backend: Any, out_dir: Path) -> dict[str, Path]:
    """The end-of-run exports named in checkpoint.export (collective; rank 0 writes).

    The backend gathers every tensor (unsharded, fp32 masters for the trained ones) to rank 0,
    where the family writes them under ``<out_dir>/export`` (DiT4SR: ``dit4sr/family.py``). With
    ``train.ema`` the same exports are also written from the EMA weights under ``export/ema/``.
    """
    kinds = list(dict.fromkeys(cfg.checkpoint.export))
    if not kinds:
        return {}
    full = backend.full_state_dict()  # collective
    ema = backend.ema_state_dict() if cfg.train.ema else {}  # collective; trained params only
    out: dict[str, Path] = {}
    if backend.is_main:
        out.update(family.export(cfg, kinds, full, out_dir / "export"))
        if ema:
            ema_out = family.export(cfg, kinds, {**full, **ema}, out_dir / "export" / "ema")
            out.update({f"ema_{k}": v for k, v in ema_out.items()})
    backend.barrier()
    return out


def validate(family: Any, cfg: Config, backend: Any, batch: dict[str, Any], tb: Any,
             step: int) -> None:
    """Log the family's validation picture of the last batch (log.val_every; collective)."""
    if family.validate is not None:
        tb.image("val/sr", family.validate(backend.model, batch, cfg, backend.autocast()), step)


# ----------------------------------------------------------------------------------------------
# entry point


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        cfg = build_config(args)
        check_paths(cfg)
    except ConfigError as e:  # before any process group: a clear message, no traceback
        print(f"framer-train: error: {e}", file=sys.stderr)
        return 2
    from framer_dist.data import DataSourceError
    from framer_dist.models import ModelLoadError
    from framer_dist.safe_load import CheckpointLoadError
    t0 = time.monotonic()
    try:
        result = train(cfg)
    except (ConfigError, DataSourceError, ModelLoadError, CheckpointLoadError) as e:
        # what only the data source, the weights or the checkpoint reveal (no images, no
        # empty-prompt cache, a preset that does not fit the folder, a checkpoint file that is
        # damaged or would run code): the message names the key or the file; no traceback
        print(f"framer-train: error: {e}", file=sys.stderr)
        return 2
    if result.preempted:  # the preemption message said what was saved
        return cfg.checkpoint.requeue_exit_code
    if result.is_main:
        print(closing_line(result, cfg.train.steps, time.monotonic() - t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
