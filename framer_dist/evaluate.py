"""Score super-resolved images the way SR papers do, and write a table per dataset.

- PSNR and SSIM on the Y channel (ITU-R BT.601, the MATLAB ``rgb2ycbcr`` convention, Y in
  [16, 235]) after cropping ``crop_border`` pixels on every side (usually the scale factor),
  implemented here in float64: SSIM with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, L = 255, averaged over the valid region (Wang et al. 2004; what BasicSR reports).
- LPIPS, NIQE, MANIQA, MUSIQ, CLIPIQA through the optional package ``pyiqa`` with weight files
  from a local folder (no network). pyiqa needs torchvision, which this project's environment
  must not contain (docs/inference.md), so these metrics run where pyiqa is installed and fail
  here with a message that says what is missing.

Paired mode (``--gt`` given): full-reference and no-reference metrics. No-reference mode: only
the no-reference ones (NIQE, MANIQA, MUSIQ, CLIPIQA). Output: ``<dataset>.md`` / ``.csv`` (one
row per method), ``<dataset>_per_image.csv``, and ``table.md`` / ``results.json`` merging every
dataset evaluated into the same output folder (the layout of the paper's Table 1).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from framer_dist.atomic import write_text_atomic
from framer_dist.infer.io import InferenceError, list_images, read_image


class MetricError(InferenceError):
    """A metric cannot run (missing package or weight file); the message names what is missing."""


# ----------------------------------------------------------------------------------------------
# PSNR / SSIM on Y


def _as_float255(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    return a.astype(np.float64) * 255.0  # float images are taken to be in [0, 1]


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB image (uint8, or float in [0, 1]) as float64 in [16, 235]."""
    a = _as_float255(img)
    return 16.0 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255.0


def _prepare(pred: np.ndarray, gt: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    if np.shape(pred) != np.shape(gt):
        raise ValueError(f"prediction and ground truth differ in size: {np.shape(pred)} vs {np.shape(gt)}")
    yp, yg = rgb_to_y(pred), rgb_to_y(gt)
    if crop_border:
        c = crop_border
        if yp.shape[0] <= 2 * c or yp.shape[1] <= 2 * c:
            raise ValueError(f"crop_border {c} leaves nothing of a {yp.shape[0]}x{yp.shape[1]} image")
        yp, yg = yp[c:-c, c:-c], yg[c:-c, c:-c]
    return yp, yg


def psnr_y(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0) -> float:
    """PSNR in dB on the Y channel (data range 255); ``inf`` for identical images."""
    yp, yg = _prepare(pred, gt, crop_border)
    mse = float(np.mean((yp - yg) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _gaussian_window(sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_y(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0) -> float:
    """Mean SSIM on the Y channel: Gaussian window 11x11 / sigma 1.5, valid region, L = 255."""
    yp, yg = _prepare(pred, gt, crop_border)
    if min(yp.shape) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {yp.shape}")
    w = _gaussian_window()
    a = torch.from_numpy(yp)[None, None]
    b = torch.from_numpy(yg)[None, None]
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a ** 2
    var_b = F.conv2d(b * b, w) - mu_b ** 2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


# ----------------------------------------------------------------------------------------------
# pyiqa metrics (optional)


@dataclass(frozen=True)
class MetricInfo:
    name: str
    higher_is_better: bool
    full_reference: bool
    weight_file: str | None = None   # the file pyiqa would download; must be in the weights folder


METRICS: dict[str, MetricInfo] = {
    "psnr": MetricInfo("PSNR", True, True),
    "ssim": MetricInfo("SSIM", True, True),
    "lpips": MetricInfo("LPIPS", False, True, "LPIPS_v0.1_alex-df73285e.pth"),
    "niqe": MetricInfo("NIQE", False, False, "niqe_modelparameters.mat"),
    "maniqa": MetricInfo("MANIQA", True, False, "ckpt_koniq10k.pt"),
    "musiq": MetricInfo("MUSIQ", True, False, "musiq_koniq_ckpt-e95806b9.pth"),
    "clipiqa": MetricInfo("CLIPIQA", True, False, "RN50.pt"),
}
PAPER_METRICS = ["psnr", "ssim", "lpips", "niqe", "maniqa", "musiq", "clipiqa"]


def find_weight_file(metric: str, weights_dir: str | Path | None) -> Path:
    """Locate ``metric``'s weight file in ``weights_dir`` (or its ``pyiqa/`` or ``checkpoints/``)."""
    info = METRICS[metric]
    if not weights_dir:
        raise MetricError(f"metric '{metric}' needs its weight file '{info.weight_file}'; pass "
                          "--iqa-weights DIR with that file in it (no downloads at run time)")
    d = Path(weights_dir)
    for cand in (d / info.weight_file, d / "pyiqa" / info.weight_file, d / "checkpoints" / info.weight_file):
        if cand.is_file():
            return cand
    raise MetricError(f"metric '{metric}' needs the weight file '{info.weight_file}', which is not in "
                      f"{d} (nor {d / 'pyiqa'}); copy it there from pyiqa's cache "
                      "(~/.cache/torch/hub/pyiqa on a machine with network)")


def load_iqa_metric(metric: str, weights_dir: str | Path | None, device: str = "cpu"
                    ) -> Callable[[torch.Tensor, torch.Tensor | None], float]:
    """A pyiqa metric as ``fn(pred [1,3,H,W] in [0,1], gt or None) -> float``.

    Checks the weight file first, then that pyiqa is importable; both errors name what is missing.
    """
    path = find_weight_file(metric, weights_dir)
    previous_hub = torch.hub.get_dir()
    try:
        # pyiqa resolves auxiliary downloads (backbones) under torch.hub's dir: point it here.
        torch.hub.set_dir(str(Path(weights_dir)))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import pyiqa  # noqa: F401  (optional; needs torchvision)
    except Exception as e:  # ImportError, or a broken torchvision import inside it
        torch.hub.set_dir(previous_hub)
        raise MetricError(
            f"metric '{metric}' needs the optional package 'pyiqa' ({type(e).__name__}: {e}). "
            "pyiqa requires torchvision, which must not be installed in this project's environment; "
            "run tools/evaluate.py from a separate environment with pyiqa installed, or evaluate "
            "only psnr,ssim here") from None
    kwargs = {} if metric == "clipiqa" else {"pretrained_model_path": str(path)}
    try:
        m = pyiqa.create_metric(metric, device=torch.device(device), as_loss=False, **kwargs)
    except Exception as e:
        raise MetricError(f"pyiqa could not build metric '{metric}' from {path}: {e}") from None

    def score(pred: torch.Tensor, gt: torch.Tensor | None) -> float:
        with torch.no_grad():
            out = m(pred.to(device), gt.to(device)) if METRICS[metric].full_reference else m(pred.to(device))
        return float(out.mean())
    return score


# ----------------------------------------------------------------------------------------------
# folders -> numbers -> tables


def _pairs(pred_dir: Path, gt_dir: Path | None) -> list[tuple[Path, Path | None]]:
    preds = list_images(pred_dir)
    if gt_dir is None:
        return [(p, None) for p in preds]
    gts = {g.stem: g for g in list_images(gt_dir)}
    missing = [p.name for p in preds if p.stem not in gts]
    if missing:
        raise InferenceError(f"{len(missing)} prediction(s) in {pred_dir} have no ground truth with the "
                             f"same file stem in {gt_dir}: {', '.join(missing[:5])}")
    return [(p, gts[p.stem]) for p in preds]


def evaluate_folder(pred_dir: str | Path, gt_dir: str | Path | None, metrics: list[str],
                    crop_border: int = 4, iqa_weights: str | Path | None = None,
                    device: str = "cpu") -> tuple[list[dict], dict[str, float]]:
    """Score every image of ``pred_dir``; returns (per-image rows, per-metric means)."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InferenceError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if gt_dir is None:
        fr = [m for m in metrics if METRICS[m].full_reference]
        if fr:
            raise InferenceError(f"metric(s) {fr} need ground truth (--gt); without it only "
                                 f"{[m for m in METRICS if not METRICS[m].full_reference]} apply")
    # load every pyiqa metric up front: a missing file fails before any work is done
    iqa = {m: load_iqa_metric(m, iqa_weights, device) for m in metrics if METRICS[m].weight_file}
    from framer_dist.infer.io import to_tensor

    rows = []
    for p, g in _pairs(Path(pred_dir), Path(gt_dir) if gt_dir else None):
        pred = read_image(p)
        gt = read_image(g) if g is not None else None
        if gt is not None and pred.shape != gt.shape:
            raise InferenceError(f"{p.name}: prediction is {pred.shape[1]}x{pred.shape[0]} but ground "
                                 f"truth {g} is {gt.shape[1]}x{gt.shape[0]}")
        row: dict = {"image": p.name}
        for m in metrics:
            if m == "psnr":
                row[m] = psnr_y(pred, gt, crop_border)
            elif m == "ssim":
                row[m] = ssim_y(pred, gt, crop_border)
            else:
                row[m] = iqa[m](to_tensor(pred), to_tensor(gt) if gt is not None else None)
        rows.append(row)
    means = {m: float(np.mean([r[m] for r in rows])) for m in metrics}
    return rows, means


def _fmt(metric: str, v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.2f}" if metric in ("psnr", "musiq", "niqe") else f"{v:.4f}"


def markdown_table(dataset_results: dict[str, dict[str, dict[str, float]]], metrics: list[str]) -> str:
    """``{dataset: {method: {metric: value}}}`` -> Markdown (best per dataset and column in bold)."""
    head = "| Dataset | Method | " + " | ".join(
        METRICS[m].name + ("↑" if METRICS[m].higher_is_better else "↓") for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for ds, methods in dataset_results.items():
        best = {}
        for m in metrics:
            vals = [r[m] for r in methods.values() if r.get(m) is not None and not math.isnan(r[m])]
            if len(vals) > 1:
                best[m] = max(vals) if METRICS[m].higher_is_better else min(vals)
        for i, (method, r) in enumerate(methods.items()):
            cells = []
            for m in metrics:
                v = r.get(m)
                s = _fmt(m, v) if v is not None else "-"
                cells.append(f"**{s}**" if m in best and v == best[m] else s)
            lines.append(f"| {ds if i == 0 else ''} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_tables(out_dir: str | Path, dataset: str, method_means: dict[str, dict[str, float]],
                 per_image: dict[str, list[dict]], metrics: list[str]) -> dict[str, Path]:
    """Write this dataset's tables and merge it into ``results.json`` / ``table.md``.

    Every file is replaced atomically: a crash (or a full disk) mid-write leaves the previous
    ``results.json`` whole, with the datasets evaluated before."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{dataset}.md", "csv": out / f"{dataset}.csv",
             "per_image": out / f"{dataset}_per_image.csv", "json": out / "results.json",
             "table": out / "table.md"}
    merged = {}
    if paths["json"].exists():  # read first: a damaged file stops before anything is written
        try:
            merged = json.loads(paths["json"].read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InferenceError(f"{paths['json']} is not valid JSON ({e}); it holds the results "
                                 "merged so far: repair it or move it away") from None
    write_text_atomic(paths["md"], markdown_table({dataset: method_means}, metrics))
    write_text_atomic(paths["csv"], _csv_text(
        ["dataset", "method"] + metrics,
        [[dataset, method] + [r.get(m) for m in metrics] for method, r in method_means.items()]))
    write_text_atomic(paths["per_image"], _csv_text(
        ["method", "image"] + metrics,
        [[method, r["image"]] + [r.get(m) for m in metrics]
         for method, rows in per_image.items() for r in rows]))
    merged.setdefault(dataset, {}).update(method_means)
    write_text_atomic(paths["json"], json.dumps(merged, indent=2, allow_nan=True))
    all_metrics = [m for m in PAPER_METRICS if any(m in r for d in merged.values() for r in d.values())]
    write_text_atomic(paths["table"], markdown_table(merged, all_metrics))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/evaluate.py",
        description="PSNR/SSIM (Y channel, border crop) and pyiqa metrics of SR results, as a "
                    "Markdown + CSV table per dataset.")
    p.add_argument("--pred", action="append", required=True, metavar="[METHOD=]DIR",
                   help="folder of SR results; repeat for several methods (METHOD=DIR names the row)")
    p.add_argument("--gt", default=None, help="ground-truth HR folder (paired mode); omit for no-reference")
    p.add_argument("--dataset", default="dataset", help="dataset name (table row group / file name)")
    p.add_argument("--metrics", default=None,
                   help="comma list from: " + ",".join(METRICS) + " (default: psnr,ssim with --gt, "
                        "plus the pyiqa ones when --iqa-weights is given)")
    p.add_argument("--crop-border", type=int, default=4, help="pixels cropped per side for PSNR/SSIM")
    p.add_argument("--iqa-weights", default=None, help="local folder with the pyiqa weight files")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="eval", help="output folder for the tables")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.metrics:
        metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    else:
        metrics = (["psnr", "ssim"] if args.gt else []) + \
            ([m for m in PAPER_METRICS if METRICS[m].weight_file and (args.gt or not METRICS[m].full_reference)]
             if args.iqa_weights else [])
        if not metrics:
            print("error: nothing to compute: no --gt and no --iqa-weights", file=sys.stderr)
            return 2
    preds = []
    for spec in args.pred:
        name, _, folder = spec.rpartition("=")
        preds.append((name or Path(folder).name, folder))
    names = [n for n, _ in preds]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # one row per name: a second folder of the same name would replace the first
        print(f"error: several --pred folders have the row name {', '.join(map(repr, dup))}; "
              "name them with METHOD=DIR", file=sys.stderr)
        return 2
    try:
        means, per_image = {}, {}
        for name, folder in preds:
            per_image[name], means[name] = evaluate_folder(folder, args.gt, metrics, args.crop_border,
                                                           args.iqa_weights, args.device)
        paths = write_tables(args.out, args.dataset, means, per_image, metrics)
    except (InferenceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text(), end="")
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['per_image']}; all datasets: {paths['table']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
