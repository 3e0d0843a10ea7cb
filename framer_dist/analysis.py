"""The layer-hierarchy study of the FRAMER paper (supplement Fig. 7 and Fig. 9).

For each checkpoint and each chosen timestep ``t`` (default 300 and 700; ``sigma = t / 1000``), the
model family's readout (``InferenceSpec.readout``; dit4sr: the HR latents noised to
``x_t = (1 - sigma) x0 + sigma eps``, the same ``eps`` for every checkpoint, one forward with the
per-layer readout) gives every block's FRAMER feature, and for every block ``i`` we report,
averaged over the images:

- ``cos_lf``, ``cos_hf``: cosine similarity of block i's LF / HF band vector to the final layer's
  (Fig. 7; 1 at the last layer by construction);
- ``w_lf``, ``w_hf`` (FAW) and ``a_lf``, ``a_hf`` (FAM), the adaptive weights the FRAMER loss
  would give that layer (Fig. 9).

The band maths is *not* re-implemented here: every number comes from
``framer_dist.framer.framer_objective`` (its per-layer metrics), run with the ``framer`` section of
the config (feature kind, mask, radius, FAW denominator, ...), every block as a student and the
final block (or the teacher the readout gives) as the teacher. Outputs: ``hierarchy.json``, ``layer_similarity.png`` (Fig. 7: LF blue,
HF red; the first checkpoint solid, the next dashed) and ``faw_fam_weights.png`` (Fig. 9).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from framer_dist.config import ConfigError, FramerConfig, load_config
from framer_dist.framer import framer_objective, select_layers
from framer_dist.infer.io import InferenceError, list_images, read_image, to_tensor
from framer_dist.models import DEFAULT_FAMILY, ModelFamily, ModelLoadError, get_family

METRICS = ("cos_lf", "cos_hf", "w_lf", "w_hf", "a_lf", "a_hf")


def layer_band_metrics(features: Tensor, cfg: FramerConfig, teacher_index: int = -1,
                       teacher: Tensor | None = None) -> dict[str, Tensor]:
    """Per-layer ``cos/w/a`` for LF and HF of ``features`` ``[L, B, C, H, W]`` vs one of its layers.

    Every layer is a student; the teacher is ``features[teacher_index]``, or ``teacher`` when
    given (a family whose teacher is not one of its layers). In-batch negatives are switched off
    (they change only the loss, not these metrics, and would need B >= 2).
    """
    n = features.shape[0]
    c = dataclasses.replace(cfg, in_batch_negatives=False, nonfinite="error",
                            random_negatives=cfg.random_negatives and n >= 2)
    if not c.random_negatives and "intra" in (c.lf_loss, c.hf_loss):
        c = dataclasses.replace(c, lf_loss="inter", hf_loss="inter")  # a one-key IntraCL only warns
    res = framer_objective(features, features[teacher_index] if teacher is None else teacher, c,
                           torch.Generator().manual_seed(0))
    return {k: res.metrics[k].detach().float().cpu() for k in METRICS}


def _prepare_image(img: np.ndarray, multiple: int, max_size: int) -> Tensor:
    """Centre crop to at most ``max_size`` per side and to a multiple of ``multiple``."""
    h, w = img.shape[:2]
    th, tw = min(h, max_size), min(w, max_size)
    th, tw = th - th % multiple, tw - tw % multiple
    if th < multiple or tw < multiple:
        raise InferenceError(f"image of {w}x{h} px is too small (needs at least {multiple} px per side)")
    y, x = (h - th) // 2, (w - tw) // 2
    return to_tensor(np.ascontiguousarray(img[y:y + th, x:x + tw]))


def degrade_bicubic(hr: Tensor, scale: int) -> Tensor:
    """The analysis LR: bicubic x1/scale then back to the HR size (the SR condition layout)."""
    h, w = hr.shape[-2:]
    lr = F.interpolate(hr, size=(max(1, h // scale), max(1, w // scale)), mode="bicubic",
                       align_corners=False, antialias=True)
    return F.interpolate(lr, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def analyze(models: Sequence[tuple[str, Any]], images: Sequence[np.ndarray], vae, cfg: FramerConfig,
            timesteps: Sequence[int] = (300, 700), prompt: tuple[Tensor, Tensor] | None = None,
            scale: int = 4, max_size: int = 512, seed: int = 0,
            lr_images: Sequence[np.ndarray] | None = None,
            family: str | ModelFamily | None = None) -> dict[str, Any]:
    """Per-layer band metrics for every (model, timestep), averaged over ``images``. ``family``:
    the models' family (None = the default family, for models of no recorded family)."""
    fam = family if isinstance(family, ModelFamily) else get_family(family or DEFAULT_FAMILY)
    spec = fam.part("inference")
    if spec.readout is None:
        raise InferenceError(f"model family {fam.name!r} has no per-layer readout to analyse "
                             "(InferenceSpec.readout)")
    if not images:
        raise InferenceError("no images to analyse")
    for t in timesteps:
        if not 0 < t <= 1000:
            raise InferenceError(f"timesteps must be in (0, 1000], got {t}")
    result: dict[str, Any] = {
        "timesteps": list(timesteps), "feature": cfg.feature, "mask": cfg.mask, "radius": cfg.radius,
        "cutoff": cfg.cutoff, "faw_denominator": cfg.faw_denominator, "num_images": len(images),
        "models": {}}
    for label, model in models:
        shape = spec.shape(model)
        multiple = vae.factor * shape.multiple
        d, pd = shape.text_dims
        e, p = prompt if prompt is not None else (torch.zeros(1, 1, d), torch.zeros(1, pd))
        _, teacher = select_layers(model.num_blocks, dataclasses.replace(cfg, students="all"))
        sums: dict[str, dict[str, Tensor]] = {}
        for k, img in enumerate(images):
            hr = _prepare_image(img, multiple, max_size)
            if lr_images is not None:
                lr = F.interpolate(to_tensor(lr_images[k]), size=hr.shape[-2:], mode="bicubic",
                                   align_corners=False).clamp(0, 1)
            else:
                lr = degrade_bicubic(hr, scale)
            x0, lr_lat = vae.encode(hr), vae.encode(lr)
            for t in timesteps:
                g = torch.Generator().manual_seed(seed * 1_000_003 + k * 1009 + t)  # same for every model
                noise = torch.randn(x0.shape, generator=g)
                feats, given = spec.readout(model, x0, lr_lat, t / 1000.0, noise, (e, p), cfg.feature)
                m = layer_band_metrics(feats, cfg, teacher, teacher=given)
                layers, own_teacher = feats.shape[0], given is None
                acc = sums.setdefault(f"t{t}", {})
                for key, v in m.items():
                    acc[key] = acc.get(key, 0) + v
        result["models"][label] = {
            tk: {key: (v / len(images)).tolist() for key, v in acc.items()} for tk, acc in sums.items()}
        # the layers analysed (every block, for dit4sr); the teacher's index, or None when the
        # readout gives a teacher of its own
        result["models"][label]["num_blocks"] = int(layers)
        result["models"][label]["teacher_layer"] = int(teacher) if own_teacher else None
    return result


_STYLES = ("-", "--", ":", "-.")


def _layer_axis(ax) -> None:
    """Integer layer ticks; y from 0 (or below, for negative cosines) to 1."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lo = min([0.0] + [float(np.min(line.get_ydata())) for line in ax.get_lines()])
    ax.set_ylim(lo - 0.05, 1.05)
    ax.grid(alpha=0.3)


def plot_similarity(result: dict[str, Any], path: str | Path) -> Path:
    """Fig. 7: per-layer cosine similarity to the final layer, LF blue / HF red, one panel per t."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ts = result["timesteps"]
    fig, axes = plt.subplots(1, len(ts), figsize=(5.2 * len(ts), 3.8), squeeze=False)
    for ax, t in zip(axes[0], ts):
        for i, (label, r) in enumerate(result["models"].items()):
            layers = np.arange(1, r["num_blocks"] + 1)
            ls = _STYLES[i % len(_STYLES)]
            ax.plot(layers, r[f"t{t}"]["cos_lf"], ls, color="tab:blue", marker=".", label=f"{label} LF")
            ax.plot(layers, r[f"t{t}"]["cos_hf"], ls, color="tab:red", marker=".", label=f"{label} HF")
        ax.set_title(f"t = {t}")
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine similarity to final layer")
        _layer_axis(ax)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Layer-wise LF/HF similarity ({result['feature']} features, {result['mask']} mask)")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plot_weights(result: dict[str, Any], path: str | Path) -> Path:
    """Fig. 9: FAW (w), FAM (a) and their product per layer, LF blue / HF red, a row per t."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ts = result["timesteps"]
    fig, axes = plt.subplots(len(ts), 3, figsize=(14, 3.4 * len(ts)), squeeze=False)
    for row, t in zip(axes, ts):
        for i, (label, r) in enumerate(result["models"].items()):
            layers = np.arange(1, r["num_blocks"] + 1)
            ls = _STYLES[i % len(_STYLES)]
            d = r[f"t{t}"]
            for band, color in (("lf", "tab:blue"), ("hf", "tab:red")):
                w, a = np.asarray(d[f"w_{band}"]), np.asarray(d[f"a_{band}"])
                for ax, y in zip(row, (w, a, w * a)):
                    ax.plot(layers, y, ls, color=color, marker=".", label=f"{label} {band.upper()}")
        for ax, name in zip(row, ("FAW weight w", "FAM weight a", "w x a")):
            ax.set_title(f"{name}, t = {t}")
            ax.set_xlabel("layer")
            _layer_axis(ax)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "hierarchy.json"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["similarity"] = plot_similarity(result, out / "layer_similarity.png")
    paths["weights"] = plot_weights(result, out / "faw_fam_weights.png")
    return paths


# ----------------------------------------------------------------------------------------------
# command line (tools/analyze_hierarchy.py)


def _default_images() -> Path:
    return Path(__file__).resolve().parent / "assets" / "photos"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/analyze_hierarchy.py",
        description="Per-layer LF/HF similarity to the final layer (paper Fig. 7) and FAW/FAM "
                    "weights (Fig. 9) for one or more checkpoints, as PNG + JSON.")
    p.add_argument("--checkpoint", action="append", required=True, metavar="[LABEL=]PATH",
                   help="repeat: the first is drawn solid (e.g. baseline=...), the next dashed (FRAMER=...)")
    p.add_argument("--kind", default="auto",
                   help="checkpoint kind for all (auto or one of the family's; dit4sr: full/control/lora; "
                        "pisasr: trainer, the only one with the FRAMER heads)")
    p.add_argument("--family", default=None,
                   help="model family of the checkpoints; default: what their exports or trainer "
                        "checkpoints record, else the default family")
    p.add_argument("--base", default=None,
                   help="pretrained diffusers folder under adapter checkpoints (dit4sr: SD3 under "
                        "control/LoRA; pisasr: replaces the run's model.pretrained)")
    p.add_argument("--weights", default=None, choices=("ema", "main"),
                   help="a trainer export with an EMA export (export/ema/): 'ema' or 'main'; "
                        "default: EMA when present (as framer-sr)")
    p.add_argument("--images", default=None, help="HR image folder (default: the bundled photos)")
    p.add_argument("--lr", default=None, help="optional folder of matching LR images (same stems); "
                                               "default: bicubic x1/scale of the HR")
    p.add_argument("--max-images", type=int, default=8)
    p.add_argument("--max-size", type=int, default=512, help="centre crop of at most this many px")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--timesteps", default="300,700", help="comma list, sigma = t / 1000")
    p.add_argument("--config", default=None, help="run config TOML: its [framer] section sets the bands")
    p.add_argument("--override", action="append", default=[], help="dotted config override, e.g. framer.radius=0.1")
    p.add_argument("--vae", default=None, help="diffusers VAE folder ('' = the family's tiny random VAE)")
    p.add_argument("--text-encoders", default=None,
                   help="folder of the family's text encoders for --prompt ('hashed' for tiny models)")
    p.add_argument("--prompt", default=None, help="caption for every image (default: empty embeddings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--out", default="hierarchy", help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    from framer_dist.infer.loading import checkpoint_family, load_model, load_vae
    from framer_dist.infer.prompts import HashedPromptEncoder, text_encoder

    args = build_parser().parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    try:
        cfg = load_config(args.config, args.override).framer
        try:
            timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
        except ValueError:
            raise InferenceError(f"--timesteps: expected a comma list of integers in (0, 1000], "
                                 f"got {args.timesteps!r}") from None
        specs = [(label or Path(path).name, path)
                 for label, _, path in (spec.rpartition("=") for spec in args.checkpoint)]
        labels = [label for label, _ in specs]
        dup = sorted({label for label in labels if labels.count(label) > 1})
        if dup:  # one curve per label: a second checkpoint of the same label would replace the first
            raise InferenceError(f"several --checkpoint paths have the label {', '.join(map(repr, dup))}; "
                                 "name them with LABEL=PATH")
        folder = Path(args.images) if args.images else _default_images()
        files = list_images(folder)[: args.max_images]
        images = [read_image(f) for f in files]
        lr_images = None
        if args.lr:
            lr_by_stem = {f.stem: f for f in list_images(args.lr)}
            missing = [f.name for f in files if f.stem not in lr_by_stem]
            if missing:
                raise InferenceError(f"no LR image in {args.lr} for: {', '.join(missing[:5])}")
            lr_images = [read_image(lr_by_stem[f.stem]) for f in files]
        fams = {label: checkpoint_family(path, args.family) for label, path in specs}
        family = fams[specs[0][0]]
        if any(f.name != family.name for f in fams.values()):  # one VAE and one text encoder
            raise InferenceError("the checkpoints are of different model families ("
                                 + ", ".join(f"{k}: {f.name}" for k, f in fams.items())
                                 + "); analyse each family in its own run")
        models = [(label, load_model(
                      path, kind=args.kind, base=args.base, device=device, dtype=dtype,
                      weights=args.weights, family=family,
                      report=lambda line, label=label: print(f"analyze_hierarchy: {label}: {line}",
                                                             file=sys.stderr)))
                  for label, path in specs]
        vae = load_vae(args.vae if args.vae is not None else (args.base or ""), device=device, dtype=dtype,
                       codec=family.part("latents"))
        prompt = None
        if args.prompt is not None:
            enc = (HashedPromptEncoder(*family.inference.shape(models[0][1]).text_dims)
                   if args.text_encoders == "hashed" else
                   text_encoder(family, args.text_encoders or args.base or "", device=device, dtype=dtype))
            prompt = enc([args.prompt])
        result = analyze(models, images, vae, cfg, timesteps, prompt, args.scale, args.max_size,
                         args.seed, lr_images, family=family)
        result["images"] = [f.name for f in files]
        result["checkpoints"] = dict(specs)
        paths = write_outputs(result, args.out)
    except (InferenceError, ConfigError, ModelLoadError) as e:  # a family's readout refuses so
        print(f"analyze_hierarchy: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {paths['json']}, {paths['similarity']}, {paths['weights']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
