"""Train a model family's backbone (default: DiT4SR) with its own loss plus the FRAMER objective.

    deepspeed framer_dist/train.py --ds ds_configs/zero3.json --config configs/sd35m_framer.toml
    torchrun --nproc-per-node 8 framer_dist/train.py --backend fsdp2 --config configs/sd35m_framer.toml
    python framer_dist/train.py --config configs/tiny_cpu_demo.toml train.steps=10   # one process
    ... --resume auto | --resume runs/x/checkpoints/step_00000300

Read top to bottom: arguments -> config and path checks (``preflight.py``, before any process
group) -> model family, model, trainable set, backend, checkpoint resume, data from the global
sample position -> the loop (``Stepper.step``: per micro-batch the family's step and lambda *
FRAMER, backward; then the optimizer step; ``Logger.log_step``; checkpoint; preemption) ->
exports (``export.py``). docs/training.md is the user guide.
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
from framer_dist.log import get_logger

log = get_logger()

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
    return (f"done: step {result.steps_done} of {total_steps} "
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


@dataclass
class StepStats:
    """One optimizer step: the losses averaged over micro-batches and ranks (base, framer,
    total), the pre-clip gradient norm, the last micro-batch's FRAMER metrics and batch."""

    means: torch.Tensor
    grad_norm: float
    layer_metrics: dict[str, torch.Tensor]
    batch: dict[str, Any]
    parts: dict[str, float] = field(default_factory=dict)  # the base loss's terms, same averaging


@dataclass
class Stepper:
    """What one optimizer step uses, built once; :meth:`step` runs one."""

    cfg: Config
    family: Any
    backend: Any
    batches: Iterator[dict[str, Any]]
    students: list[int]
    teacher: int
    generator: torch.Generator          # FRAMER's random-layer draw, the same on every rank
    thr: Any                            # metrics.Throughput
    count_flops: Any = None             # the family's per-batch FLOP count, or None
    flops_per_sample: float | None = None
    vae: Any = None                     # the frozen VAE for sources that yield pixels
    helpers: Any = None                 # the family's frozen helper models (StepContext.helpers)

    def step(self, samples_seen: int) -> StepStats:
        """grad_accum micro-batches (the family's step + lambda * FRAMER, backward each), the
        deferred NaN/Inf checks, the optimizer step."""
        from framer_dist.micro_batch import micro_batch_loss
        from framer_dist.models import StepContext

        be, cfg = self.backend, self.cfg
        sums = torch.zeros(3, dtype=torch.float64, device=be.device)  # base, framer, total
        part_sums: dict[str, torch.Tensor] = {}
        layer_metrics: dict[str, torch.Tensor] = {}
        checks = []  # deferred FRAMER NaN/Inf checks, run before the optimizer step
        for micro in range(be.grad_accum):
            self.thr.data_start()
            batch = to_device(next(self.batches), be.device)
            self.thr.data_end()
            if "hr_latent" not in batch and not self.family.takes_pixels:
                from framer_dist.data import encode_batch  # pixels: degrade/encode online
                batch = encode_batch(self.vae, batch)
            positions = sample_positions(batch, samples_seen, micro, be.rank, be.world_size,
                                         cfg.data.batch_size)
            ctx = StepContext(cfg, positions, be.autocast(), self.helpers)
            losses = micro_batch_loss(self.family, be.model, batch, ctx, self.students,
                                      self.teacher, self.generator, gather=be.gather, rank=be.rank)
            be.backward(losses.total)
            checks.append(losses.verify)
            # detached sums on the device: no host sync per micro-batch
            sums += torch.stack([losses.base.detach(), losses.framer.detach(),
                                 losses.total.detach()]).double()
            for name, value in losses.parts.items():
                part_sums[name] = part_sums.get(name, 0) + value.detach().double()
            layer_metrics = losses.layer_metrics
            if self.flops_per_sample is None and self.count_flops is not None:
                self.flops_per_sample = self.count_flops(batch)
        for check in checks:
            check()
        grad_norm = be.step()
        self.thr.step_done(cfg.data.batch_size * be.grad_accum)
        # Losses averaged over micro-batches and ranks (a tiny collective, every step).
        names = sorted(part_sums)
        local = torch.cat([sums, torch.stack([part_sums[n] for n in names]).reshape(-1)
                           if names else sums.new_zeros(0)])
        means = be.gather((local / be.grad_accum).reshape(1, -1)).mean(0).cpu()
        parts = {n: float(v) for n, v in zip(names, means[3:])}
        return StepStats(means[:3], float(grad_norm), layer_metrics, batch, parts)


@dataclass
class Logger:
    """Where a step's numbers go: metrics.jsonl and the history (every step), TensorBoard, the
    data report and the progress bar (log.every), heat maps and validation pictures."""

    cfg: Config
    family: Any
    backend: Any
    tb: Any
    bar: Any
    data_lines: Any
    report: Any
    history_file: Path
    peak: float | None
    students: list[int]
    history: list[dict[str, float]] = field(default_factory=list)

    def log_step(self, step: int, st: StepStats, stepper: Stepper) -> None:
        from framer_dist import metrics

        cfg, be = self.cfg, self.backend
        rec = {"step": step, f"loss/{self.family.base_loss_name}": float(st.means[0]),
               **{f"loss/{k}": v for k, v in st.parts.items()},
               "loss/total": float(st.means[2]), "lr": be.lr, "grad_norm": st.grad_norm}
        if cfg.framer.enabled:
            rec["loss/framer"] = float(st.means[1])
        self.history.append(rec)
        if be.is_main:
            with open(self.history_file, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if step % cfg.log.every == 0 or step == cfg.train.steps:
            perf = stepper.thr.summary(stepper.flops_per_sample, self.peak, be.world_size)
            totals = self.data_lines.flush()  # collective; rank 0 prints new data lines
            # rank 0 logs the counts of all ranks, any other (log.all_ranks) its own
            data_counts = {f"data/{k}": v for k, v in
                           (totals if be.is_main else self.report.as_dict()).items()}
            self.tb.scalars({**{k: v for k, v in rec.items() if k != "step"}, **perf,
                             "memory/peak_gb": metrics.peak_memory_gb(be.device), **data_counts},
                            step)
            stepper.thr.reset()
            self.bar.set_postfix(loss=f"{rec['loss/total']:.4f}",
                                 img_s=f"{perf['perf/img_per_s']:.1f}")
        if cfg.framer.enabled and st.layer_metrics:
            if cfg.log.heatmap_every and (step % cfg.log.heatmap_every == 0 or step == 1):
                if be.is_main or cfg.log.all_ranks:
                    self.tb.image("framer/heatmap",
                                  metrics.heatmap_image(st.layer_metrics, self.students, step), step)
            if cfg.log.per_layer_scalars and step % cfg.log.every == 0:
                self.tb.scalars(metrics.framer_layer_scalars(st.layer_metrics, self.students), step)
        if cfg.log.val_every and step % cfg.log.val_every == 0 and self.family.validate is not None:
            # every rank runs it: under ZeRO-3/FSDP2 the forward is collective
            self.tb.image("val/sr", self.family.validate(be.model, st.batch, cfg, be.autocast()), step)
        self.bar.update(1)


# ----------------------------------------------------------------------------------------------
# the run


def train(cfg: Config) -> RunResult:
    """One training run (every rank calls this). Config and paths must already be validated."""
    from framer_dist import metrics
    from framer_dist.checkpoint import CheckpointManager, seed_rng
    from framer_dist.export import export
    from framer_dist.flops import peak_flops
    from framer_dist.framer import select_layers
    from framer_dist.models import get_family
    from framer_dist.parallel import setup_backend
    from framer_dist.preempt import PreemptionHandler

    t_cfg, f_cfg = cfg.train, cfg.framer
    out_dir = Path(t_cfg.out_dir)
    import os
    from framer_dist.preflight import config_warnings
    if os.environ.get("RANK", "0") == "0":  # once, before the model is built (the launcher's rank)
        for warning in config_warnings(cfg):
            log.warning(warning)
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
    # frozen helper models (VAE, LPIPS, a frozen backbone): replicated, outside the engine
    helpers = family.helpers(model, cfg, device) if family.helpers is not None else None
    accum = backend.grad_accum
    b_micro = cfg.data.batch_size
    global_batch = b_micro * world * accum
    logs_here = backend.is_main or cfg.log.all_ranks
    if f_cfg.enabled and f_cfg.in_batch_negatives and accum > 1 and backend.is_main:
        # InterCL's keys are gathered per forward, so accumulation shrinks its negatives
        log.info(f"note: InterCL compares each image with the {b_micro * world} images "
              f"of one forward (data.batch_size x world size), not the global batch of "
              f"{global_batch} ({accum} accumulated micro-batches); the authors' run used one "
                 "forward of 16 (docs/framer.md)")

    # -- resume: weights, optimizer, scheduler, EMA, RNGs, step and global data position --------
    framer_gen = torch.Generator().manual_seed(t_cfg.seed)
    ckpt = CheckpointManager.from_config(cfg, backend)
    client = ckpt.resume(cfg.checkpoint.resume, generator=framer_gen, seed=t_cfg.seed,
                         required=("step", "samples_seen"))
    step = int(client["step"]) if client else 0
    samples_seen = int(client["samples_seen"]) if client else 0
    if client and backend.is_main:
        log.info(f"resumed from {ckpt.last_loaded} at step {step} "
                 f"(sample {samples_seen}, world size {world})")

    # -- logging -------------------------------------------------------------------------------
    log_dir = Path(cfg.log.dir or out_dir / "tb")
    # after a resume at step N, TensorBoard discards what the interrupted run logged after N
    tb = metrics.TBWriter(log_dir if world == 1 or backend.is_main else log_dir / f"rank{rank}",
                          enabled=logs_here, purge_step=step + 1 if client else None)
    if backend.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        from framer_dist.atomic import write_text_atomic
        from framer_dist.config import dump_toml
        write_text_atomic(out_dir / "config.toml", dump_toml(cfg))  # a crash keeps the old one
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      t_cfg.precision)
    bar = metrics.progress_bar(t_cfg.steps, step, cfg.log.progress and backend.is_main)

    from framer_dist.data import DataReport
    report = DataReport(echo=False)  # printed by rank 0 for all ranks (DataLines)
    data_lines = DataLines(report, backend, lambda line: metrics.bar_print(bar, line))
    batches = infinite_batches(cfg, rank, world, samples_seen, report=report)
    preempt = PreemptionHandler.from_config(cfg).install()
    preempted, last_ckpt = False, None

    def save(at_step: int) -> Path:
        return ckpt.save(at_step, {"step": at_step, "samples_seen": samples_seen,
                                   "world_size": world, "config": cfg.to_dict()},
                         generator=framer_gen)

    from framer_dist.data import load_vae, yields_pixels
    vae = (load_vae(cfg.data, cfg.model.family, device=device)
           if yields_pixels(cfg.data) and not family.takes_pixels else None)
    stepper = Stepper(cfg, family, backend, batches, students, teacher, framer_gen,
                      metrics.Throughput(), count_flops, vae=vae, helpers=helpers)
    logger = Logger(cfg, family, backend, tb, bar, data_lines, report, out_dir / "metrics.jsonl",
                    peak, students)
    try:
        while step < t_cfg.steps:
            seed_rng(t_cfg.seed, step, rank, framer_gen)  # every stream: (seed, step, rank) only
            stats = stepper.step(samples_seen)
            step += 1
            samples_seen += global_batch
            logger.log_step(step, stats, stepper)

            # Preemption: every rank learns whether any rank was signalled, then all save.
            preempted = preempt.should_stop(backend)
            every = cfg.checkpoint.every
            if preempted or (every and step % every == 0) or step == t_cfg.steps:
                last_ckpt = save(step)
            if preempted:
                if backend.is_main:
                    log.info(f"preemption signal: saved {last_ckpt}; exiting with code "
                             f"{cfg.checkpoint.requeue_exit_code} for requeue")
                break
        data_lines.flush(final=True)  # collective: the last lines and the summed counts
        exports = {} if preempted else export(family, cfg, backend, out_dir)
    except BaseException:
        for _, line in report.take_new():  # this rank's unprinted lines may explain the error
            print(line, file=sys.stderr, flush=True)
        raise
    finally:
        preempt.uninstall(keep_sigterm=preempted)  # a SIGTERM while exiting: no failure
        bar.close()
        tb.close()
    return RunResult(steps_done=step, out_dir=out_dir, checkpoint=last_ckpt, exports=exports,
                     log_dir=log_dir, history=logger.history, preempted=preempted,
                     model=backend.model, is_main=backend.is_main)


# ----------------------------------------------------------------------------------------------
# entry point


def main(argv: list[str] | None = None) -> int:
    from framer_dist.preflight import check_paths
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
        log.info(closing_line(result, cfg.train.steps, time.monotonic() - t0))
    return 0


def exit_distributed(code: int) -> None:
    """A distributed rank leaves without the interpreter's finalization: gloo's worker thread may
    still be releasing its last work's tensors, and a thread that needs the GIL while Python
    finalizes is killed inside C++ code: std::terminate, exit -6 instead of ``code`` (seen after
    finished runs and after preemption saves; diagnosed with a core dump on branch ``slurm``).
    Output is flushed first. Only the script entry point does this: in-process callers of
    :func:`main` keep their process group and interpreter."""
    import logging
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def cli() -> None:
    """The script and console-script entry point (``framer-train``): :func:`main`, then the exit."""
    exit_code = main()
    exit_distributed(exit_code)
    sys.exit(exit_code)


if __name__ == "__main__":
    cli()
