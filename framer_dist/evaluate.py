"""Score super-resolved images the way SR papers do, and write a table per dataset.

- PSNR and SSIM on the Y channel (ITU-R BT.601, the MATLAB ``rgb2ycbcr`` convention, Y in
  [16, 235]) after cropping ``crop_border`` pixels on every side (usually the scale factor),
  implemented here in float64: SSIM with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, L = 255, averaged over the valid region (Wang et al. 2004; what BasicSR reports).
- LPIPS, NIQE, MANIQA, MUSIQ, CLIPIQA through pyiqa, in an evaluation environment of their own
  (``make eval-env``: torch + torchvision + pyiqa in ``.venv-eval``; torchvision must never be in
  this project's environment). They run in a subprocess, ``framer_dist/iqa_worker.py`` under
  that environment's Python, JSON in and out, with weight files from a local folder (no network).

Paired mode (``--gt`` given): full-reference and no-reference metrics. No-reference mode: only
the no-reference ones (NIQE, MANIQA, MUSIQ, CLIPIQA). Output: ``<dataset>.md`` / ``.csv`` (one
row per method), ``<dataset>_per_image.csv``, and ``table.md`` / ``results.json`` merging every
dataset evaluated into the same output folder (the layout of the paper's Table 1); with
``--baseline NAME`` every other row also shows its relative gain over that row (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F

from framer_dist import iqa_worker
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
# learned metrics: pyiqa in the evaluation environment, through framer_dist/iqa_worker.py


@dataclass(frozen=True)
class MetricInfo:
    name: str
    higher_is_better: bool
    full_reference: bool
    pyiqa: str | None = None   # the pyiqa metric the worker runs; None: computed in this process


METRICS: dict[str, MetricInfo] = {
    "psnr": MetricInfo("PSNR", True, True),
    "ssim": MetricInfo("SSIM", True, True),
    "lpips": MetricInfo("LPIPS", False, True, "lpips"),
    "niqe": MetricInfo("NIQE", False, False, "niqe"),
    "maniqa": MetricInfo("MANIQA", True, False, "maniqa"),
    "musiq": MetricInfo("MUSIQ", True, False, "musiq"),
    "clipiqa": MetricInfo("CLIPIQA", True, False, "clipiqa"),
}
PAPER_METRICS = ["psnr", "ssim", "lpips", "niqe", "maniqa", "musiq", "clipiqa"]

EVAL_PYTHON_ENV = "FRAMER_EVAL_PYTHON"
REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(iqa_worker.__file__).resolve()


def eval_python(explicit: str | os.PathLike | None = None) -> Path:
    """The evaluation environment's Python: ``explicit`` (``--eval-python``), else
    ``$FRAMER_EVAL_PYTHON``, else ``<repository>/.venv-eval/bin/python`` (what ``make eval-env`` builds)."""
    return Path(explicit or os.environ.get(EVAL_PYTHON_ENV) or REPO_ROOT / ".venv-eval" / "bin" / "python")


def check_eval_python(python: str | os.PathLike | None, metrics: list[str]) -> Path:
    """``eval_python(python)`` if it is there; else a MetricError (one line) that says how to get it."""
    py = eval_python(python)
    if not (py.is_file() and os.access(py, os.X_OK)):
        raise MetricError(f"metric(s) {', '.join(metrics)} run in the evaluation environment, whose Python "
                          f"{py} does not exist: run `make eval-env` (or give its Python with "
                          f"--eval-python or {EVAL_PYTHON_ENV})")
    return py


def worker_request(items: list[tuple[Path, Path | None]], pyiqa_metrics: list[str],
                   weights: str | os.PathLike | None, device: str = "cpu",
                   options: dict[str, dict] | None = None, seed: int = 0) -> dict:
    """The JSON request for framer_dist/iqa_worker.py (its docstring has the format)."""
    return {"protocol": iqa_worker.PROTOCOL, "metrics": list(pyiqa_metrics),
            "options": {m: dict(o) for m, o in (options or {}).items()},
            "weights": str(Path(weights).resolve()) if weights else None, "device": device, "seed": seed,
            "items": [{"pred": str(Path(p).resolve()), "gt": str(Path(g).resolve()) if g else None}
                      for p, g in items]}


def run_worker(request: dict, python: str | os.PathLike | None = None) -> dict:
    """Run the worker on ``request`` in the evaluation environment; returns its response
    (``scores``: one list per metric, ``versions``). Every failure is a one-line MetricError."""
    py = check_eval_python(python, request["metrics"])
    with tempfile.TemporaryDirectory(prefix="framer-iqa-") as tmp:
        req_path, resp_path = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req_path.write_text(json.dumps(request))
        # -I: the evaluation environment's own site-packages only (no PYTHONPATH, no user site)
        proc = subprocess.run([str(py), "-I", str(WORKER), str(req_path), str(resp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            resp = json.loads(resp_path.read_text())
        except (OSError, ValueError):
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            raise MetricError(f"the evaluation worker ({py} {WORKER.name}) stopped with exit code "
                              f"{proc.returncode} and no answer: {lines[-1] if lines else 'no output'}") from None
    if not resp.get("ok"):
        raise MetricError(str(resp.get("error", "the evaluation worker gave no error message")))
    return resp


def missing_weights(metrics: list[str], weights: str | os.PathLike | None) -> None:
    """MetricError (one line, naming the file and where it is expected) for the first learned
    metric whose weight file is not in ``weights``; checked here, before anything runs."""
    for m in metrics:
        if METRICS[m].pyiqa:
            problem = iqa_worker.missing_weight(METRICS[m].pyiqa, weights)
            if problem:
                raise MetricError(problem)


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


def evaluate_methods(preds: list[tuple[str, str | Path]], gt_dir: str | Path | None, metrics: list[str],
                     crop_border: int = 4, iqa_weights: str | Path | None = None, device: str = "cpu",
                     python: str | os.PathLike | None = None
                     ) -> tuple[dict[str, list[dict]], dict[str, dict[str, float]]]:
    """Score every image of every ``(method, folder)``; returns ({method: per-image rows},
    {method: per-metric means}). PSNR/SSIM here; the learned metrics in one worker call for all
    methods. Missing weight files or evaluation environment fail before any image is read."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InferenceError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if gt_dir is None:
        fr = [m for m in metrics if METRICS[m].full_reference]
        if fr:
            raise InferenceError(f"metric(s) {fr} need ground truth (--gt); without it only "
                                 f"{[m for m in METRICS if not METRICS[m].full_reference]} apply")
    learned = [m for m in metrics if METRICS[m].pyiqa]
    if learned:
        check_eval_python(python, learned)
        missing_weights(learned, iqa_weights)
    pairs = {name: _pairs(Path(folder), Path(gt_dir) if gt_dir else None) for name, folder in preds}
    local = [m for m in metrics if not METRICS[m].pyiqa]
    rows: dict[str, list[dict]] = {}
    for name, items in pairs.items():
        rows[name] = []
        for p, g in items:
            row: dict = {"image": p.name}
            if local:
                pred, gt = read_image(p), read_image(g)
                if pred.shape != gt.shape:
                    raise InferenceError(f"{p.name}: prediction is {pred.shape[1]}x{pred.shape[0]} but "
                                         f"ground truth {g} is {gt.shape[1]}x{gt.shape[0]}")
                for m in local:
                    row[m] = psnr_y(pred, gt, crop_border) if m == "psnr" else ssim_y(pred, gt, crop_border)
            rows[name].append(row)
    if learned:
        # full-reference learned metrics get the ground truth; no-reference ones only the prediction
        flat = [(name, i, p, g) for name, items in pairs.items() for i, (p, g) in enumerate(items)]
        req = worker_request([(p, g) for _, _, p, g in flat], [METRICS[m].pyiqa for m in learned],
                             iqa_weights, device)
        print(f"learned metrics {', '.join(learned)} on {len(flat)} image(s) in {eval_python(python)} ...",
              file=sys.stderr, flush=True)
        resp = run_worker(req, python)
        v = resp.get("versions", {})
        print(f"  pyiqa {v.get('pyiqa')}, torch {v.get('torch')}, torchvision {v.get('torchvision')}",
              file=sys.stderr)
        for m in learned:
            for (name, i, _, _), score in zip(flat, resp["scores"][METRICS[m].pyiqa]):
                rows[name][i][m] = score
    means = {name: {m: float(np.mean([r[m] for r in rs])) for m in metrics} for name, rs in rows.items()}
    return rows, means


def evaluate_folder(pred_dir: str | Path, gt_dir: str | Path | None, metrics: list[str],
                    crop_border: int = 4, iqa_weights: str | Path | None = None,
                    device: str = "cpu", python: str | os.PathLike | None = None
                    ) -> tuple[list[dict], dict[str, float]]:
    """Score every image of ``pred_dir``; returns (per-image rows, per-metric means)."""
    rows, means = evaluate_methods([("_", pred_dir)], gt_dir, metrics, crop_border, iqa_weights,
                                   device, python)
    return rows["_"], means["_"]


def relative_gain(metric: str, value: float | None, base: float | None) -> float | None:
    """Relative gain in percent of ``value`` over ``base`` in the metric's direction (positive =
    better: higher for PSNR/SSIM/MANIQA/MUSIQ/CLIPIQA, lower for LPIPS/NIQE); None when either is
    missing or not finite, or the base is 0."""
    if value is None or base is None or not (math.isfinite(value) and math.isfinite(base)) or base == 0:
        return None
    g = (value - base) / abs(base) * 100.0
    return g if METRICS[metric].higher_is_better else -g


def _fmt(metric: str, v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.2f}" if metric in ("psnr", "musiq", "niqe") else f"{v:.4f}"


def _gain_text(g: float | None) -> str:
    return "" if g is None else f" ({g:+.2f}%)"


def markdown_table(dataset_results: dict[str, dict[str, dict[str, float]]], metrics: list[str],
                   baseline: str | None = None) -> str:
    """``{dataset: {method: {metric: value}}}`` -> Markdown (best per dataset and column in bold).

    With ``baseline``: in every dataset that has a row of that name, every other row's cell also
    shows its relative gain over it, in the metric's direction (``relative_gain``; the paper's
    green percentages)."""
    head = "| Dataset | Method | " + " | ".join(
        METRICS[m].name + ("↑" if METRICS[m].higher_is_better else "↓") for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for ds, methods in dataset_results.items():
        best = {}
        for m in metrics:
            vals = [r[m] for r in methods.values() if r.get(m) is not None and not math.isnan(r[m])]
            if len(vals) > 1:
                best[m] = max(vals) if METRICS[m].higher_is_better else min(vals)
        base = methods.get(baseline) if baseline else None
        for i, (method, r) in enumerate(methods.items()):
            cells = []
            for m in metrics:
                v = r.get(m)
                s = _fmt(m, v) if v is not None else "-"
                s = f"**{s}**" if m in best and v == best[m] else s
                if base is not None and method != baseline:
                    s += _gain_text(relative_gain(m, v, base.get(m)))
                cells.append(s)
            lines.append(f"| {ds if i == 0 else ''} | {method} | " + " | ".join(cells) + " |")
    if baseline and any(baseline in methods for methods in dataset_results.values()):
        lines += ["", f"Percentages: the relative gain over {baseline}, in each metric's direction "
                      "(positive = better)."]
    return "\n".join(lines) + "\n"


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_tables(out_dir: str | Path, dataset: str, method_means: dict[str, dict[str, float]],
                 per_image: dict[str, list[dict]], metrics: list[str],
                 baseline: str | None = None) -> dict[str, Path]:
    """Write this dataset's tables and merge it into ``results.json`` / ``table.md``.

    ``baseline``: the row the others' relative gains are computed against (in the Markdown tables
    and as ``<metric>_gain_pct`` columns of ``<dataset>.csv``); a row of this dataset evaluated
    now or merged before. ``results.json`` holds the values only.

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
    rows = dict(method_means)
    if baseline and baseline not in rows:  # evaluated in an earlier run: its row joins this table
        if baseline not in merged.get(dataset, {}):
            raise InferenceError(f"--baseline {baseline!r} is not a row of dataset {dataset!r}: not among "
                                 f"the --pred names ({', '.join(method_means)}) nor in {paths['json']}")
        rows = {baseline: merged[dataset][baseline], **rows}
    write_text_atomic(paths["md"], markdown_table({dataset: rows}, metrics, baseline))
    gain_cols = [f"{m}_gain_pct" for m in metrics] if baseline else []
    write_text_atomic(paths["csv"], _csv_text(
        ["dataset", "method"] + metrics + gain_cols,
        [[dataset, method] + [r.get(m) for m in metrics]
         + ([None if method == baseline else relative_gain(m, r.get(m), rows[baseline].get(m))
             for m in metrics] if baseline else [])
         for method, r in rows.items()]))
    write_text_atomic(paths["per_image"], _csv_text(
        ["method", "image"] + metrics,
        [[method, r["image"]] + [r.get(m) for m in metrics]
         for method, rows in per_image.items() for r in rows]))
    merged.setdefault(dataset, {}).update(method_means)
    write_text_atomic(paths["json"], json.dumps(merged, indent=2, allow_nan=True))
    all_metrics = [m for m in PAPER_METRICS if any(m in r for d in merged.values() for r in d.values())]
    write_text_atomic(paths["table"], markdown_table(merged, all_metrics, baseline))
    return paths


def check_against_pyiqa(photos: str | Path, work: str | Path, python: str | os.PathLike | None = None,
                        scale: int = 4) -> tuple[list[dict], dict[str, str]]:
    """The evaluation environment checked end to end: each photo of ``photos`` is the ground truth
    (cropped to a multiple of ``scale``), its bicubic x1/scale then x scale copy the prediction
    (PNGs in ``work``); PSNR/SSIM on Y with ``crop_border = scale`` from this module and from
    pyiqa's own ``psnry`` / ``ssim`` (``color_space="ycbcr"``, BT.601 as here) through the worker.
    Returns (one row per photo, the worker's versions)."""
    from PIL import Image

    hr_dir, sr_dir = Path(work) / "hr", Path(work) / "sr"
    hr_dir.mkdir(parents=True, exist_ok=True)
    sr_dir.mkdir(parents=True, exist_ok=True)
    rows, items = [], []
    for f in list_images(photos):
        gt = read_image(f)
        h, w = gt.shape[0] // scale * scale, gt.shape[1] // scale * scale
        gt = gt[:h, :w]
        lr = Image.fromarray(gt).resize((w // scale, h // scale), Image.BICUBIC)
        pred = np.asarray(lr.resize((w, h), Image.BICUBIC))
        Image.fromarray(gt).save(hr_dir / f"{f.stem}.png")
        Image.fromarray(pred).save(sr_dir / f"{f.stem}.png")
        items.append((sr_dir / f"{f.stem}.png", hr_dir / f"{f.stem}.png"))
        rows.append({"image": f.name, "size": f"{w}x{h}", "psnr": psnr_y(pred, gt, scale),
                     "ssim": ssim_y(pred, gt, scale)})
    opts = {"color_space": "ycbcr", "crop_border": scale}
    resp = run_worker(worker_request(items, ["psnry", "ssim"], None, options={"psnry": opts, "ssim": opts}),
                      python)
    for r, p_, s_ in zip(rows, resp["scores"]["psnry"], resp["scores"]["ssim"]):
        r["pyiqa_psnr"], r["pyiqa_ssim"] = p_, s_
    return rows, resp["versions"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/evaluate.py",
        description="PSNR/SSIM (Y channel, border crop) and pyiqa's learned metrics (in the "
                    "evaluation environment) of SR results, as a Markdown + CSV table per dataset.")
    p.add_argument("--pred", action="append", required=True, metavar="[METHOD=]DIR",
                   help="folder of SR results; repeat for several methods (METHOD=DIR names the row)")
    p.add_argument("--gt", default=None, help="ground-truth HR folder (paired mode); omit for no-reference")
    p.add_argument("--dataset", default="dataset", help="dataset name (table row group / file name)")
    p.add_argument("--metrics", default=None,
                   help="comma list from: " + ",".join(METRICS) + " (default: psnr,ssim with --gt, "
                        "plus the pyiqa ones when --iqa-weights is given)")
    p.add_argument("--crop-border", type=int, default=4, help="pixels cropped per side for PSNR/SSIM")
    p.add_argument("--iqa-weights", default=None,
                   help="local folder with the learned metrics' weight files, laid out like torch.hub's "
                        "cache (pyiqa/, checkpoints/, clip/); nothing is downloaded")
    p.add_argument("--eval-python", default=None,
                   help=f"Python of the evaluation environment that runs the learned metrics (default: "
                        f"${EVAL_PYTHON_ENV}, else .venv-eval/bin/python of this checkout: `make eval-env`)")
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="row (METHOD name) the other rows show their relative gain over, per metric, "
                        "in the metric's direction")
    p.add_argument("--device", default="cpu", help="device of the learned metrics (cpu, cuda)")
    p.add_argument("--out", default="eval", help="output folder for the tables")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.metrics:
        metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    else:
        metrics = (["psnr", "ssim"] if args.gt else []) + \
            ([m for m in PAPER_METRICS if METRICS[m].pyiqa and (args.gt or not METRICS[m].full_reference)]
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
        if args.baseline and args.baseline not in names:  # a row merged before: check before the work
            prev = Path(args.out) / "results.json"
            try:
                known = json.loads(prev.read_text()).get(args.dataset, {}) if prev.is_file() else {}
            except (ValueError, OSError, AttributeError):
                known = None  # damaged: write_tables names the file, before it writes anything
            if known is not None and args.baseline not in known:
                raise InferenceError(f"--baseline {args.baseline!r} is not a row of dataset {args.dataset!r}: "
                                     f"not among the --pred names ({', '.join(names)}) nor in {prev}")
        per_image, means = evaluate_methods(preds, args.gt, metrics, args.crop_border, args.iqa_weights,
                                            args.device, args.eval_python)
        paths = write_tables(args.out, args.dataset, means, per_image, metrics, args.baseline)
    except (InferenceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text(), end="")
    print(f"wrote {paths['md']}, {paths['csv']}, {paths['per_image']}; all datasets: {paths['table']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
