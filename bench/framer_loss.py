"""Benchmark: the vectorised FRAMER objective vs the slow per-layer reference.

Forward + backward wall time and peak memory, both implementations in one run, reported as
ratios. Default shape is SD3.5-medium at 512 px with the x0/velocity readout: 23 student layers,
B = 16, C = 16, 64 x 64 latents.

    python bench/framer_loss.py                      # CPU, writes bench/results/framer_loss_cpu.json
    python bench/framer_loss.py --device cuda        # GPU, writes bench/results/framer_loss_cuda.json
    python bench/framer_loss.py --tiny --out /tmp/x.json   # seconds; used by a test so this can't rot

Timing: ``--reps`` interleaved repetitions (ours, reference, ours, ...) after one warm-up each;
median and min are reported (the median is the headline; interleaving keeps a noisy shared machine
fair to both). CUDA timings synchronise before reading the clock.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the inputs. On CPU, each
implementation runs once more in its own fresh subprocess and we report the growth of the peak
resident set (``VmHWM``, reset via ``/proc/self/clear_refs`` just before the call) over the
resident set just before the call (inputs already allocated; a tiny call beforehand keeps one-time library start-up out). That counts everything
the call makes the process hold: tensors, allocator slack, FFT
plans. (tracemalloc would miss torch's allocations entirely.)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framer_dist.config import FramerConfig  # noqa: E402
from framer_dist.framer import framer_objective  # noqa: E402
from framer_dist.framer.reference import reference_framer_loss  # noqa: E402

FULL = dict(layers=23, batch=16, channels=16, size=64)
TINY = dict(layers=3, batch=2, channels=2, size=8)


def _inputs(shape: dict, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    n, b, c, s = shape["layers"], shape["batch"], shape["channels"], shape["size"]
    students = torch.randn(n, b, c, s, s, generator=g).to(device=device, dtype=dtype)
    teacher = (0.7 * students[-1].float() + 0.3 * torch.randn(b, c, s, s, generator=g).to(device)).to(dtype)
    return students.requires_grad_(True), teacher


def _step(impl: str, students, teacher, cfg: FramerConfig) -> float:
    gen = torch.Generator().manual_seed(1)
    if impl == "ours":
        loss = framer_objective(students, teacher, cfg, gen).loss
    else:
        # the same draw rule, so both do the same work
        from framer_dist.framer.layers import draw_negative_layers
        neg = draw_negative_layers(students.shape[0], gen).tolist() if cfg.random_negatives else None
        loss, _ = reference_framer_loss(students, teacher, cfg, neg)
    loss.backward()
    students.grad = None
    return loss.item()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(impl: str, students, teacher, cfg, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    _step(impl, students, teacher, cfg)
    _sync(device)
    return time.perf_counter() - t0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """This process's peak resident set (VmHWM). Unlike ``ru_maxrss`` it is not inherited across
    fork+exec from the parent, and it can be reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _mem_child(args) -> None:
    """Run one implementation once in this fresh process; print its peak-RSS growth as JSON."""
    cfg = FramerConfig(mask=args.mask)
    # one tiny call first: one-time library start-up (MKL/FFT, thread pools) is not per-step memory
    _step(args.mem_child, *_inputs(TINY, "cpu", _dtype(args.dtype)), cfg)
    students, teacher = _inputs(TINY if args.tiny else FULL, "cpu", _dtype(args.dtype))
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before_rss = _rss_bytes()
    before_peak = _hwm_bytes()
    _step(args.mem_child, students, teacher, cfg)
    after_peak = _hwm_bytes()
    print(json.dumps({"peak_growth_bytes": after_peak - before_rss, "hwm_reset": reset,
                      "peak_before_call_bytes": before_peak, "rss_before_call_bytes": before_rss,
                      "peak_after_call_bytes": after_peak}))


def _cpu_peak(impl: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mem-child", impl, "--mask", args.mask,
           "--dtype", args.dtype, "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cuda_peak(impl: str, students, teacher, cfg) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(impl, students, teacher, cfg)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg_at_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="tiny shape, 2 reps: a smoke run for tests")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--mask", default="radial", choices=["radial", "teacher_quantile"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out", default="", help="JSON path (default bench/results/framer_loss_<device>.json)")
    p.add_argument("--mem-child", default="", choices=["", "ours", "ref"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child:
        _mem_child(args)
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    reps = 2 if args.tiny else args.reps
    shape = TINY if args.tiny else FULL
    cfg = FramerConfig(mask=args.mask)
    students, teacher = _inputs(shape, args.device, _dtype(args.dtype))
    machine = _machine(args.device)

    # correctness first: the two must agree, or the timing means nothing
    gen = torch.Generator().manual_seed(1)
    ours = framer_objective(students, teacher, cfg, gen)
    from framer_dist.framer.layers import draw_negative_layers
    ref, _ = reference_framer_loss(students, teacher, cfg,
                                   draw_negative_layers(shape["layers"], torch.Generator().manual_seed(1)).tolist())
    agree = abs(ours.loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    del ours, ref

    times = {"ours": [], "ref": []}
    for impl in times:  # warm-up (FFT plans, allocator)
        _timed(impl, students, teacher, cfg, args.device)
    for _ in range(reps):
        for impl in times:
            times[impl].append(_timed(impl, students, teacher, cfg, args.device))

    if args.device == "cuda":
        peak = {impl: _cuda_peak(impl, students, teacher, cfg) for impl in ("ours", "ref")}
        mem_method = "torch.cuda.max_memory_allocated growth over the allocated inputs"
        mem_detail = {}
    else:
        mem_detail = {impl: _cpu_peak(impl, args) for impl in ("ours", "ref")}
        peak = {impl: d["peak_growth_bytes"] for impl, d in mem_detail.items()}
        mem_method = ("peak RSS (VmHWM, reset right before the call) growth over the RSS just before "
                      "one fwd+bwd call, each implementation in its own fresh subprocess")
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "framer_loss forward+backward: vectorised objective vs per-layer reference",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else
                   "python bench/framer_loss.py " + " ".join(argv),
        "device": args.device,
        "machine": {**machine, "loadavg_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "shape": {"students": [shape["layers"], shape["batch"], shape["channels"], shape["size"], shape["size"]],
                  "teacher": [shape["batch"], shape["channels"], shape["size"], shape["size"]]},
        "dtype": args.dtype,
        "config": {"mask": cfg.mask, "radius": cfg.radius, "use_rfft": cfg.use_rfft, "faw": cfg.faw,
                   "fam": cfg.fam, "random_negatives": cfg.random_negatives,
                   "in_batch_negatives": cfg.in_batch_negatives},
        "losses_agree": agree,
        "reps": reps,
        "seconds": {k: {"median": med[k], "min": min(v), "all": v} for k, v in times.items()},
        "speedup_median": med["ref"] / med["ours"],
        "speedup_min": min(times["ref"]) / min(times["ours"]),
        "peak_memory_bytes": peak,
        "peak_memory_ratio_ours_over_ref": peak["ours"] / max(peak["ref"], 1),
        "peak_memory_method": mem_method,
        "peak_memory_detail": mem_detail,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"framer_loss_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup_median", "speedup_min", "peak_memory_bytes",
                                             "peak_memory_ratio_ours_over_ref", "losses_agree")}, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
