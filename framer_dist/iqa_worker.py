"""The learned-metric worker: pyiqa in the evaluation environment, JSON in, JSON out.

``tools/evaluate.py`` runs it as a script with the evaluation environment's Python (``make
eval-env`` builds ``.venv-eval``: torch + torchvision + pyiqa, pinned in requirements-eval.txt)::

    .venv-eval/bin/python framer_dist/iqa_worker.py REQUEST.json RESPONSE.json
    .venv-eval/bin/python framer_dist/iqa_worker.py --versions

It imports the standard library, numpy and PIL at the top and torch and pyiqa only when it
scores; never the rest of framer_dist (diffusers is not in that environment). The trainer's
environment imports this module too (as ``framer_dist.iqa_worker``) for the request format, the
weight-file table and the image reader, so a missing file is reported before anything runs.

Request (JSON object)::

    {"protocol": 1,
     "metrics": ["lpips", "musiq"],                 # pyiqa metric names
     "options": {"musiq": {}},                      # optional: keyword options of create_metric
     "weights": "/models/iqa" or null,              # torch.hub's dir for pyiqa (see below)
     "device": "cpu", "seed": 0,
     "items": [{"pred": "/abs/sr/a.png", "gt": "/abs/hr/a.png" or null}, ...]}

Response::

    {"protocol": 1, "ok": true, "versions": {"torch": ..., "pyiqa": ...},
     "scores": {"lpips": [one float per item], ...}}
    {"protocol": 1, "ok": false, "error": "one line naming what is wrong"}    (exit code 2)

Weight files: pyiqa and torchvision look for them under torch.hub's directory, which the worker
sets to ``weights`` before importing pyiqa, so that folder has the layout of a torch hub cache
(``~/.cache/torch/hub`` on a machine that ran the metrics once can be copied as it is):
``pyiqa/<file>`` (pyiqa's own weights), ``checkpoints/<file>`` (torchvision backbones),
``clip/<file>`` (OpenAI CLIP). Nothing is downloaded: every download pyiqa would start fails
with one line naming the file and the path where it is expected.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

PROTOCOL = 1

# What pyiqa 0.1.16 opens for each metric, relative to torch.hub's dir (checked against pyiqa's
# own URLs in tests/test_evaluate.py when the evaluation environment exists).
WEIGHT_FILES: dict[str, tuple[str, ...]] = {
    "lpips": ("pyiqa/LPIPS_v0.1_alex-df73285e.pth", "checkpoints/alexnet-owt-7be5be79.pth"),
    "niqe": ("pyiqa/niqe_modelparameters.mat",),
    "maniqa": ("pyiqa/ckpt_koniq10k.pt",),
    "musiq": ("pyiqa/musiq_koniq_ckpt-e95806b9.pth",),
    "clipiqa": ("clip/RN50.pt",),
}


class WorkerError(Exception):
    """A problem the user fixes (missing file, bad request, no pyiqa); the message is one line."""


def missing_weight(metric: str, weights: str | os.PathLike | None) -> str | None:
    """One line naming the first weight file of ``metric`` that is not in ``weights``, or None."""
    files = WEIGHT_FILES.get(metric, ())
    if not files:
        return None
    if not weights:
        return (f"metric '{metric}' needs the weight file(s) {', '.join(Path(f).name for f in files)}: "
                f"pass --iqa-weights DIR, a folder laid out like torch.hub's cache "
                f"({', '.join('DIR/' + f for f in files)}); nothing is downloaded")
    for rel in files:
        path = Path(weights) / rel
        if not path.is_file():
            return (f"metric '{metric}' needs the weight file {Path(rel).name}, not found at {path} "
                    f"(where pyiqa looks with torch.hub's dir = --iqa-weights {weights}); copy it there "
                    f"from ~/.cache/torch/hub/{rel} of a machine that ran the metric once")
    return None


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]``, decoded as framer_dist.data.images.to_rgb does (the pixels the
    in-process PSNR/SSIM see): EXIF orientation applied, 16-bit scaled by 255/65535, alpha
    composited on white, every other mode through PIL's convert("RGB")."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            img = ImageOps.exif_transpose(im) or im
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                a = np.asarray(img).astype(np.float64)
                top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
                a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                img = Image.fromarray(a).convert("RGB")
            elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                img = img.convert("RGB")
            elif mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise WorkerError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise WorkerError(f"cannot read image {path}: {e}") from None


def check_request(req: dict) -> None:
    """Raise WorkerError (one line) unless ``req`` is a request of this protocol."""
    if not isinstance(req, dict) or req.get("protocol") != PROTOCOL:
        raise WorkerError(f"request is not a protocol-{PROTOCOL} object (got protocol "
                          f"{req.get('protocol') if isinstance(req, dict) else type(req).__name__})")
    metrics, items = req.get("metrics"), req.get("items")
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise WorkerError("request: 'metrics' must be a non-empty list of pyiqa metric names")
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("pred"), str)
                                              for i in items):
        raise WorkerError("request: 'items' must be a list of {\"pred\": path, \"gt\": path or null}")
    if not isinstance(req.get("options", {}), dict):
        raise WorkerError("request: 'options' must be an object {metric: {option: value}}")


def versions() -> dict[str, str]:
    import platform

    out = {"python": platform.python_version(), "executable": sys.executable, "numpy": np.__version__}
    for name in ("PIL", "torch", "torchvision", "pyiqa", "timm"):
        try:
            mod = __import__(name)
            out["pillow" if name == "PIL" else name] = str(getattr(mod, "__version__", "?"))
        except Exception as e:  # report, do not fail: --versions is a diagnostic
            out["pillow" if name == "PIL" else name] = f"not importable ({type(e).__name__}: {e})"
    return out


def _block_downloads(hub_dir: str) -> None:
    """Every download pyiqa, torchvision or CLIP would start becomes a one-line WorkerError."""
    import urllib.request

    import torch.hub

    def no_download(url, dst, *args, **kwargs):
        raise WorkerError(f"pyiqa wants the file {os.path.basename(str(dst))}, not found at {dst} "
                          f"(torch.hub's dir = --iqa-weights {hub_dir}; it would download {url}); "
                          "copy it there: nothing is downloaded")

    def no_urlopen(url, *args, **kwargs):
        name = os.path.basename(str(getattr(url, "full_url", url)))
        raise WorkerError(f"pyiqa wants the file {name}, not found under {hub_dir} (it would "
                          f"download {getattr(url, 'full_url', url)}); copy it there: nothing is downloaded")

    torch.hub.download_url_to_file = no_download
    urllib.request.urlopen = no_urlopen
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HOME", os.path.join(hub_dir, "huggingface"))


def _import_pyiqa(hub_dir: str):
    import torch

    torch.hub.set_dir(hub_dir)  # before pyiqa's import: its DEFAULT_CACHE_DIR is read then
    _block_downloads(hub_dir)
    try:
        import pyiqa
        import pyiqa.utils.download_util as download_util
    except Exception as e:
        raise WorkerError(f"pyiqa is not importable in {sys.executable} ({type(e).__name__}: {e}); "
                          "this is not the evaluation environment: run `make eval-env`") from None
    download_util.download_url_to_file = torch.hub.download_url_to_file
    return pyiqa


def _build(pyiqa, metric: str, options: dict, device: str, hub_dir: str):
    import torch

    if metric not in pyiqa.list_models():
        raise WorkerError(f"pyiqa {pyiqa.__version__} has no metric '{metric}'")
    restore = None
    if metric.startswith("maniqa"):
        # MANIQA builds timm's vit_base_patch8_224 with pretrained=True (a Hugging Face download)
        # and then loads its own checkpoint over the whole model, backbone included, with
        # strict=True: the backbone's pretrained tensors are all replaced, so skip fetching them.
        import pyiqa.archs.maniqa_arch as maniqa_arch

        real = maniqa_arch.timm.create_model

        def create_model(name, *args, **kwargs):
            kwargs["pretrained"] = False
            return real(name, *args, **kwargs)

        maniqa_arch.timm.create_model, restore = create_model, (maniqa_arch.timm, real)
    try:
        return pyiqa.create_metric(metric, device=torch.device(device), as_loss=False, **options)
    except WorkerError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())
        files = ", ".join(os.path.join(hub_dir, f) for f in WEIGHT_FILES.get(metric, ()))
        raise WorkerError(f"pyiqa could not build metric '{metric}': {type(e).__name__}: {msg}"
                          + (f" (its weight files: {files})" if files else "")) from None
    finally:
        if restore:
            restore[0].create_model = restore[1]


def run(req: dict) -> dict:
    """Score every item with every metric; returns the response object (raises WorkerError)."""
    check_request(req)
    metrics, items = req["metrics"], req["items"]
    weights = req.get("weights")
    for m in metrics:  # before anything is built: name the first missing file
        problem = missing_weight(m, weights)
        if problem:
            raise WorkerError(problem)
    if weights:
        if not Path(weights).is_dir():
            raise WorkerError(f"--iqa-weights {weights} is not a folder")
        hub_dir = str(Path(weights).resolve())
    else:
        import tempfile
        hub_dir = tempfile.mkdtemp(prefix="iqa-hub-")  # weightless metrics: an empty hub, no downloads
    pyiqa = _import_pyiqa(hub_dir)
    import torch

    device = req.get("device") or "cpu"
    built = {m: _build(pyiqa, m, dict(req.get("options", {}).get(m, {})), device, hub_dir)
             for m in metrics}
    full_ref = {m: built[m].metric_mode == "FR" for m in metrics}
    scores: dict[str, list[float]] = {m: [] for m in metrics}
    seed = int(req.get("seed", 0))
    for it in items:
        pred = read_rgb(it["pred"])
        gt = None
        if any(full_ref.values()):
            if not it.get("gt"):
                raise WorkerError(f"full-reference metric(s) {[m for m in metrics if full_ref[m]]} "
                                  f"need a ground truth for {it['pred']}")
            gt = read_rgb(it["gt"])
            if gt.shape != pred.shape:
                raise WorkerError(f"{it['pred']}: prediction is {pred.shape[1]}x{pred.shape[0]} but "
                                  f"ground truth {it['gt']} is {gt.shape[1]}x{gt.shape[0]}")
        x = torch.from_numpy(pred).permute(2, 0, 1)[None].float() / 255.0
        y = torch.from_numpy(gt).permute(2, 0, 1)[None].float() / 255.0 if gt is not None else None
        for m in metrics:
            torch.manual_seed(seed)  # metrics that sample crops score the same way every run
            with torch.no_grad():
                out = built[m](x, y) if full_ref[m] else built[m](x)
            scores[m].append(float(torch.as_tensor(out).float().mean()))
    return {"protocol": PROTOCOL, "ok": True, "versions": versions(), "scores": scores}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--versions"]:  # `make eval-env`'s last step: fails unless the three import
        v = versions()
        print(json.dumps(v, indent=1))
        return 1 if any(v[k].startswith("not importable") for k in ("torch", "torchvision", "pyiqa")) else 0
    if len(argv) != 2:
        print("usage: iqa_worker.py REQUEST.json RESPONSE.json | --versions", file=sys.stderr)
        return 2
    req_path, resp_path = argv
    try:
        try:
            req = json.loads(Path(req_path).read_text())
        except (OSError, ValueError) as e:
            raise WorkerError(f"cannot read the request {req_path}: {e}") from None
        # pyiqa prints progress ("Loading pretrained model ...") to stdout: keep it on stderr
        stdout, sys.stdout = sys.stdout, sys.stderr
        try:
            resp = run(req)
        finally:
            sys.stdout = stdout
        code = 0
    except WorkerError as e:
        resp, code = {"protocol": PROTOCOL, "ok": False, "error": str(e)}, 2
    Path(resp_path).write_text(json.dumps(resp, allow_nan=True))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
