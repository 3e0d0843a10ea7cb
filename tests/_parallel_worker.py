"""Worker for the distributed backend/checkpoint tests: runs a list of training phases in one
process (one launch = one import of torch/deepspeed), each with a fresh model and backend.

Launched by tests/_parallel_launch.py with RANK/WORLD_SIZE/MASTER_* set (as torchrun does).
A phase writes <out>/<name>/: losses.json (rank 0), weights.pt (final full trainable state),
loaded.pt (the full trainable state right after a resume), info.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _tiny_parallel import batch, make_model  # noqa: E402
from framer_dist.checkpoint import CheckpointManager, seed_rng  # noqa: E402
from framer_dist.config import load_config  # noqa: E402
from framer_dist.parallel import setup_backend  # noqa: E402
from framer_dist.preempt import PreemptionHandler  # noqa: E402
from framer_dist.train import exit_distributed  # noqa: E402

GLOBAL_BATCH = 4


def ds_json(out: Path, stage: int, leaf: list[str] | None = None) -> str:
    """ZeRO-3 leaf classes: ``leaf`` in DeepSpeed's own leaf-module setting ([] = none, every
    submodule fetched by itself), or None: no setting, the backend makes the model's blocks leaves."""
    # every rank writes the same content atomically: no rank can read a missing/partial file
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0,
            "reduce_bucket_size": 1 << 20, "allgather_bucket_size": 1 << 20}
    if stage == 3 and leaf is not None:
        zero["leaf_module"] = {"classes": leaf}
    name = f"ds_zero{stage}{'_leaf' if stage == 3 and leaf is None else ''}"
    p = out / f"{name}.json"
    tmp = out / f".{name}.{os.environ['RANK']}.json"
    tmp.write_text(json.dumps({"zero_optimization": zero}))
    os.replace(tmp, p)
    return str(p)


def run_phase(out: Path, ph: dict) -> None:
    name = ph["name"]
    pdir = out / name
    pdir.mkdir(parents=True, exist_ok=True)
    ov = [f"parallel.backend='{ph['backend']}'", f"train.precision='{ph.get('precision', 'fp32')}'",
          f"train.optimizer='{ph.get('optimizer', 'adamw')}'", "parallel.activation_checkpointing='all'",
          f"train.global_batch_size={GLOBAL_BATCH}", "data.batch_size=1", "train.lr=0.01",
          f"train.steps={ph['steps']}", "train.lr_schedule='warmup_cosine'", "train.warmup_steps=2",
          "train.grad_clip=1.0", f"train.ema={str(ph.get('ema', False)).lower()}", "train.ema_decay=0.5",
          f"checkpoint.preempt_signal='{ph.get('signal', 'SIGUSR1')}'"]
    if ph["backend"] == "deepspeed":
        ov.append(f"parallel.ds_config='{ph.get('ds_config') or ds_json(out, ph.get('stage', 3), ph.get('leaf', []))}'")
    cfg = load_config(None, ov)
    model, params = make_model(0, ph.get("mode", "control"))
    be = setup_backend(cfg, model, params)
    mgr = CheckpointManager(out / ph["ckpt"], be, keep_last=ph.get("keep_last", 3))
    gen = torch.Generator().manual_seed(123)
    pre = PreemptionHandler(cfg.checkpoint.preempt_signal).install()
    start, info = 0, {"world": be.world_size, "grad_accum": be.grad_accum}
    if ph.get("resume"):
        spec = ph["resume"] if ph["resume"] == "auto" else str(out / ph["resume"])
        with __import__("warnings").catch_warnings(record=True) as caught:
            __import__("warnings").simplefilter("always")
            client = mgr.resume(spec, generator=gen, seed=cfg.train.seed)
        info["warnings"] = [str(w.message) for w in caught]
        if client is not None:
            start = client["step"]
            info.update(resumed_from=mgr.last_loaded.name, rng_exact=mgr.rng_restored_exactly,
                        samples=client["samples"])
            sd = be.full_trainable_state_dict()
            if be.is_main:
                torch.save(sd, pdir / "loaded.pt")
    losses: dict[int, float] = {}
    if ph.get("count_fetches"):  # ZeRO-3: what the parameter coordinator does in each step
        from framer_dist.parallel.deepspeed.instrument import zero3_fetch_counter
        info["zero3_leaves"] = be.zero3_leaves
        info["fetches"] = []
    for step in range(start, ph["steps"]):
        seed_rng(cfg.train.seed, step, be.rank, gen)
        if ph.get("preempt_at") == step and be.rank == ph.get("preempt_rank", 1):
            os.kill(os.getpid(), getattr(signal, ph.get("signal", "SIGUSR1")))
        micro = batch(step, be.rank, be.world_size, 1, GLOBAL_BATCH)
        assert len(micro) == be.grad_accum
        info.setdefault("lrs", {})[step] = be.lr  # the LR this step's update uses
        local = 0.0
        counter = zero3_fetch_counter() if ph.get("count_fetches") else contextlib.nullcontext()
        with counter as counts:
            for x, y in micro:
                with be.autocast():
                    loss = ((be.model(x.to(be.device)) - y.to(be.device)).float() ** 2).mean()
                be.backward(loss)
                local += loss.detach().float() / len(micro)
            norm = be.step()
        if counts is not None:
            info["fetches"].append(dict(counts))
        losses[step] = float(be.gather(local.reshape(1)).mean())
        assert torch.isfinite(torch.tensor(norm)), norm
        info.setdefault("norms", {})[step] = float(norm)  # pre-clip global norm
        done = step + 1
        client = {"step": done, "samples": done * GLOBAL_BATCH}
        if ph.get("kill_at_save") == done:
            # kill -9 rank 0 in the middle of the checkpoint write: after the backend wrote its
            # files, before the completion marker
            orig = be.save

            def dying_save(path, cs, _orig=orig):
                _orig(path, cs)
                be.barrier()
                if be.rank == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
                be.barrier()
            be.save = dying_save
            mgr.save(done, client, gen)
        if ph.get("every") and done % ph["every"] == 0:
            mgr.save(done, client, gen)
        if pre.should_stop(be):
            mgr.save(done, client, gen)
            info["preempted_at"] = done
            _finish(be, pdir, losses, info)
            # the trainer's way out after a preemption save (not SystemExit: see exit_distributed)
            exit_distributed(cfg.checkpoint.requeue_exit_code)
            raise SystemExit(cfg.checkpoint.requeue_exit_code)
    _finish(be, pdir, losses, info)
    pre.uninstall()


def _finish(be, pdir: Path, losses: dict, info: dict) -> None:
    sd = be.full_trainable_state_dict()
    ema = be.ema_state_dict()
    if be.is_main:
        torch.save(sd, pdir / "weights.pt")
        if ema:
            torch.save(ema, pdir / "ema.pt")
        (pdir / "losses.json").write_text(json.dumps(losses))
        (pdir / "info.json").write_text(json.dumps(info))
    be.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    phases = json.loads(Path(sys.argv[2]).read_text())
    for ph in phases:
        run_phase(out, ph)


if __name__ == "__main__":
    main()
    exit_distributed(0)  # as the trainer's ranks do: no gloo abort at interpreter exit
