#!/usr/bin/env python
"""Throughput of the batched Real-ESRGAN degradation vs a per-image loop of the same operations.

  python bench/degrade.py                      # CPU, 512 px, batch 16
  python bench/degrade.py --device cuda        # on the GPU: eager, CUDA-graphed and loop
  python bench/degrade.py --tiny               # seconds-long smoke run (used by the tests)

Writes bench/results/degrade_<device>.json and regenerates bench/results/degrade.md from every
degrade_*.json there. HR images are crops of the bundled photographs (framer_dist/assets/photos).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framer_dist.data.degrade import degrade, degrade_loop  # noqa: E402

PHOTOS = ROOT / "framer_dist" / "assets" / "photos"


def hr_batch(n: int, res: int, device: str) -> torch.Tensor:
    """n HR crops at res x res from the bundled photos (upscaled, as the loader does)."""
    files = sorted(PHOTOS.glob("*.jpg"))
    out = []
    for i in range(n):
        im = Image.open(files[i % len(files)]).convert("RGB")
        s = res / min(im.size)
        im = im.resize((max(res, round(im.size[0] * s)), max(res, round(im.size[1] * s))),
                       Image.Resampling.BICUBIC)
        a = np.asarray(im)[:res, :res]
        out.append(torch.from_numpy(a.copy()).permute(2, 0, 1))
    return (torch.stack(out).float() / 255).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, iters: int) -> float:
    _sync(device)
    t = time.perf_counter()
    for it in range(iters):
        fn(it)
    _sync(device)
    return time.perf_counter() - t


def batch_invariant(hr: torch.Tensor, seeds: list[int], run) -> bool:
    """Does sample 0 come out the same when it sits elsewhere among other batch-mates (same size)?"""
    a = run(hr, seeds)
    perm = list(range(1, len(seeds))) + [0]
    mates = [s + 7_777_777 for s in seeds]
    mates[-1] = seeds[0]
    b = run(hr[perm], mates)
    return all(torch.equal(a[k][0], b[k][-1]) for k in a)


def graphed(x: torch.Tensor, s: list[int]) -> dict[str, torch.Tensor]:
    return degrade(x, s, batched=True, graph=True)


def graphed_results(hr: torch.Tensor, seeds, ref: dict, a: argparse.Namespace, dev: str,
                    ips_loop: float) -> dict:
    """The CUDA-graphed path: its throughput (the headline), its equality with the eager batched
    call, and the GPU memory the process holds with the graph cached."""
    out = graphed(hr, seeds(0))                       # capture (warm-up inside)
    equal = all(torch.equal(out[k], ref[k]) for k in ref)
    t = timed(lambda it: graphed(hr, seeds(it + 1)), dev, a.iters)
    ips = a.batch * a.iters / t
    return {"graphed_images_per_s": round(ips, 2), "graphed_ms_per_batch": round(1000 * t / a.iters, 2),
            "graphed_speedup_vs_loop": round(ips / ips_loop, 2), "graphed_equals_batched": equal,
            "cuda_memory_reserved_gib": round(torch.cuda.memory_reserved() / 2 ** 30, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--iters", type=int, default=3, help="timed batches per variant")
    ap.add_argument("--loop-iters", type=int, default=None, help="timed batches of the loop (default --iters)")
    ap.add_argument("--tiny", action="store_true", help="64 px, batch 4, one iteration")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/degrade_<device>.json)")
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.res, a.batch, a.iters = 64, 4, 1
    dev = a.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    hr = hr_batch(a.batch, a.res, dev)
    seeds = lambda it: [1000 * it + i for i in range(a.batch)]  # noqa: E731
    eager = lambda x, s: degrade(x, s, batched=True, graph=False)  # noqa: E731
    # warm-up (kernels, allocator, bessel tables) and the equality check of both paths
    ref = eager(hr, seeds(0))
    loop = degrade_loop(hr, seeds(0))
    identical = all(torch.equal(ref[k], loop[k]) for k in ref)
    max_diff = max(float((ref[k] - loop[k]).abs().max()) for k in ref)
    t_b = timed(lambda it: eager(hr, seeds(it + 1)), dev, a.iters)
    li = a.loop_iters or a.iters
    t_l = timed(lambda it: degrade_loop(hr, seeds(it + 1)), dev, li)
    ips_b = a.batch * a.iters / t_b
    ips_l = a.batch * li / t_l
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else (platform.processor() or platform.machine())
    res = {
        "device": dev, "device_name": name, "threads": torch.get_num_threads(),
        "resolution": a.res, "batch": a.batch, "iters": a.iters, "loop_iters": li,
        "batched_images_per_s": round(ips_b, 2), "loop_images_per_s": round(ips_l, 2),
        "speedup": round(ips_b / ips_l, 2), "ms_per_batch": round(1000 * t_b / a.iters, 2),
        "batched_equals_loop": identical, "max_abs_diff_batched_vs_loop": max_diff,
    }
    if dev.startswith("cuda"):
        res.update(graphed_results(hr, seeds, ref, a, dev, ips_l))
    res["batch_invariant"] = batch_invariant(hr, seeds(0), graphed if dev.startswith("cuda") else eager)
    res.update({
        "torch": torch.__version__, "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "note": a.note,
        "command": "python bench/degrade.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
    })
    print(json.dumps(res, indent=1))
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"degrade_{dev.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    if not a.out:
        write_markdown(out.parent)
    return 0


def write_markdown(folder: Path) -> None:
    rows = []
    for p in sorted(folder.glob("degrade_*.json")):
        r = json.loads(p.read_text())
        rows.append(f"| {r['device_name']} ({r['device']}, {r['threads']} threads) | {r['resolution']} | "
                    f"{r['batch']} | {r.get('graphed_images_per_s', '-')} | {r['batched_images_per_s']} | "
                    f"{r['loop_images_per_s']} | "
                    f"{r['speedup']}x | {r['ms_per_batch']} | {r['batched_equals_loop']} | "
                    f"{r.get('batch_invariant', '-')} | "
                    f"torch {r['torch']}, {r['date']} | `{r['command']}` | {r.get('note', '')} |")
    text = ("# Degradation throughput (bench/degrade.py)\n\n"
            "Full two-stage Real-ESRGAN degradation of Table 6 (USM, blur, resize, noise, JPEG, final "
            "sinc, x4, bicubic back-upsampling) on HR crops of the bundled photos. *graphed*: the "
            "batched call replayed from a CUDA graph (CUDA only); *batched*: one eager call for the "
            "batch; *loop*: the same function one image at a time. *equal*: batched and loop give "
            "bit-identical outputs; *invariant*: a sample gives the same bits among other batch-mates "
            "(same batch size). speedup and ms/batch: eager batched.\n\n"
            "| device | px | batch | graphed img/s | batched img/s | loop img/s | speedup | ms/batch | equal | "
            "invariant | versions, date | command | note |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    (folder / "degrade.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
