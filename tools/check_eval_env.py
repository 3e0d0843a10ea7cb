#!/usr/bin/env python
"""Check the evaluation environment end to end: pyiqa's PSNR/SSIM through the worker against
this project's on the bundled photos (bicubic x1/4 then x4 as the prediction; no weights needed).

    python tools/check_eval_env.py [--eval-python .venv-eval/bin/python] [--photos DIR]

Prints a Markdown table (one row per photo) and the evaluation environment's versions; exit code
1 when the two differ by more than 0.01 dB (PSNR) or 0.005 (SSIM), 2 when the environment is
missing or broken (one line: what to do).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framer_dist.evaluate import check_against_pyiqa  # noqa: E402
from framer_dist.infer.io import InferenceError  # noqa: E402

PSNR_TOL, SSIM_TOL = 0.01, 0.005


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/check_eval_env.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-python", default=None, help="the evaluation environment's Python")
    p.add_argument("--photos", default=str(Path(__file__).resolve().parents[1] / "framer_dist" / "assets" / "photos"))
    p.add_argument("--scale", type=int, default=4)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eval-check-") as work:
        try:
            rows, versions = check_against_pyiqa(args.photos, work, args.eval_python, args.scale)
        except InferenceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print("| photo | size | PSNR (ours) | PSNR (pyiqa psnry) | diff | SSIM (ours) | SSIM (pyiqa ssim) | diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['size']} | {r['psnr']:.4f} | {r['pyiqa_psnr']:.4f} | "
              f"{r['pyiqa_psnr'] - r['psnr']:+.5f} | {r['ssim']:.5f} | {r['pyiqa_ssim']:.5f} | "
              f"{r['pyiqa_ssim'] - r['ssim']:+.6f} |")
    dp = max(abs(r["pyiqa_psnr"] - r["psnr"]) for r in rows)
    ds = max(abs(r["pyiqa_ssim"] - r["ssim"]) for r in rows)
    print(f"\nlargest difference: PSNR {dp:.5f} dB, SSIM {ds:.6f} (tolerance {PSNR_TOL} dB, {SSIM_TOL})")
    print("evaluation environment: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0 if dp <= PSNR_TOL and ds <= SSIM_TOL else 1


if __name__ == "__main__":
    raise SystemExit(main())
