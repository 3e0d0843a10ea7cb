"""`make demo`: train a tiny backbone (the default family's, DiT4SR) with FRAMER on CPU on the
bundled photographs.

    python -m framer_dist.demo --out runs/demo [--steps 40]

A few tens of optimizer steps of the tiny preset on the real photos in
``framer_dist/assets/photos`` (online Real-ESRGAN degradation, a tiny random VAE), then: a
checkpoint, TensorBoard logs (losses, throughput, the per-layer FRAMER heat map), the exported
control weights, one photo super-resolved x4 with the inference sampler, and the layer-hierarchy
plots (framer_dist.analysis, initialisation vs trained). Prints where everything went. The model is tiny and
random-initialised, so the upscaled image shows the plumbing, not quality.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from framer_dist.config import Config, load_config
from framer_dist.data.images import IMAGE_EXTS
from framer_dist.models import get_family

PACKAGE = Path(__file__).resolve().parent
PHOTOS = PACKAGE / "assets" / "photos"  # package data: shipped with the package
# The run config lives in the source checkout, as every config (configs/ at the repository root,
# not package data): `make demo` installs the checkout editable (pip install -e .), so it is there.
DEMO_CONFIG = PACKAGE.parent / "configs" / "tiny_cpu_demo.toml"


class DemoError(Exception):
    """The demo cannot start; the message says what is missing."""


def demo_config(out: Path, steps: int, overrides: list[str], config: Path = DEMO_CONFIG) -> Config:
    """``config`` (the checkout's configs/tiny_cpu_demo.toml) pointed at the packaged photos and
    ``out``."""
    if not Path(config).is_file():
        raise DemoError(f"demo config not found: {config}; the demo runs from a source checkout "
                        "(`make demo`, or `pip install -e .` there), or pass --config with a copy "
                        "of the repository's configs/tiny_cpu_demo.toml")
    base = [
        'model.preset="tiny"', 'data.source="folder"', f'data.path="{PHOTOS.as_posix()}"',
        'train.device="cpu"', 'train.precision="fp32"', 'parallel.backend="none"',
    ]
    run = [f'train.out_dir="{out.as_posix()}"', f"train.steps={steps}",
           f"checkpoint.every={max(1, steps // 2)}", f"log.val_every={max(1, steps // 2)}",
           'checkpoint.resume=""']
    return load_config(config, base + run + overrides)


def _photos() -> list[Path]:
    files = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in IMAGE_EXTS) \
        if PHOTOS.is_dir() else []
    if not files:
        raise SystemExit(f"demo: no photographs found in {PHOTOS}")
    return files


@torch.no_grad()
def upscale_photo(cfg: Config, model: torch.nn.Module, photo: Path, out_png: Path,
                  steps: int = 20) -> Path:
    """Super-resolve one bundled photo x``data.scale`` with the trained model.

    The photo's centre crop is made the LR input (``resolution / scale`` pixels), bicubic-upsampled
    and VAE-encoded as in training; the family's sampler (dit4sr: FlowMatch Euler, the run's sigma
    shift) with the empty-prompt embedding, no CFG, no tiling; AdaIN colour fix."""
    import numpy as np
    from PIL import Image

    from framer_dist.data import decode_latents, load_vae, prompt_shapes
    from framer_dist.infer.pipeline import InferenceOptions

    r, s = cfg.data.resolution, cfg.data.scale
    img = Image.open(photo).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    lr_img = img.crop((left, top, left + side, top + side)).resize((r // s, r // s), Image.BICUBIC)
    lr_up = lr_img.resize((r, r), Image.BICUBIC)
    x = torch.from_numpy(np.array(lr_up)).permute(2, 0, 1)[None].float() / 127.5 - 1
    vae = load_vae(cfg.data, cfg.model.family)
    lr_lat = vae.encode(x)
    t, d, p = prompt_shapes(cfg)
    side = max(lr_lat.shape[-2:])  # one tile: the whole latent
    opts = InferenceOptions(steps=steps, guidance=1.0, tile=side, overlap=0)
    was = model.training
    model.eval()
    lat = get_family(cfg.model.family).part("inference").sample(
        model, lr_lat, (torch.zeros(1, t, d), torch.zeros(1, p)), None, opts, seed=0, dtype=None,
        progress=None)
    model.train(was)
    from framer_dist.infer.colorfix import adain_color_fix
    # the authors' AdaIN colour fix against the bicubic input, as the inference pipeline does
    sr = adain_color_fix((decode_latents(cfg.data, lat, cfg.model.family) + 1) / 2, (x + 1) / 2)[0] * 2 - 1
    panel = torch.cat([x[0], sr], dim=2)  # bicubic | super-resolved, side by side
    arr = ((panel.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(out_png)
    lr_img.save(out_png.with_name(out_png.stem + "_input_lr.png"))
    return out_png


def layer_hierarchy_plot(cfg: Config, model: torch.nn.Module, photos: list[Path],
                         out_dir: Path) -> dict[str, Path]:
    """The paper's Fig. 7 / Fig. 9 study (framer_dist.analysis) on the bundled photos, comparing
    the untrained initialisation with the trained model."""
    from framer_dist import analysis
    from framer_dist.infer.io import read_image
    from framer_dist.infer.loading import load_vae as load_codec

    family = get_family(cfg.model.family)
    torch.manual_seed(cfg.train.seed)  # the trainer's initialisation, untrained
    init = family.build(cfg)
    family.trainable(init, cfg)
    was = model.training
    model.eval()
    images = [read_image(p) for p in photos[:3]]
    result = analysis.analyze([("init", init.eval()), ("trained", model)], images,
                              load_codec(cfg.data.vae or None, codec=family.part("latents")),
                              cfg.framer, scale=cfg.data.scale, max_size=cfg.data.resolution,
                              seed=cfg.train.seed, family=family)
    model.train(was)
    return analysis.write_outputs(result, out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m framer_dist.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    ap.add_argument("--sample-steps", type=int, default=20, help="Euler steps of the upscale")
    ap.add_argument("--config", type=Path, default=DEMO_CONFIG,
                    help="run config (default: the checkout's configs/tiny_cpu_demo.toml)")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    out = Path(args.out)
    try:  # before anything under --out is touched
        cfg = demo_config(out, args.steps, args.overrides, args.config)
    except DemoError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    if (out / "checkpoints").exists() or (out / "tb").exists():  # a fresh demo every time
        import shutil
        for sub in ("checkpoints", "tb", "export", "samples", "metrics.jsonl", "config.toml"):
            p = out / sub
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    photos = _photos()
    print(f"[demo] training the {cfg.model.preset} {cfg.model.family} backbone + FRAMER on "
          f"{len(photos)} photos from {PHOTOS} for {cfg.train.steps} steps on CPU", flush=True)

    from framer_dist.preflight import check_paths
    from framer_dist.train import train
    check_paths(cfg)
    t0 = time.time()
    result = train(cfg)
    t_train = time.time() - t0
    last = result.history[-1] if result.history else {}
    model = result.model
    sr = upscale_photo(cfg, model, photos[0], out / "samples" / f"{photos[0].stem}_x{cfg.data.scale}.png",
                       steps=args.sample_steps)
    plots = layer_hierarchy_plot(cfg, model, photos, out / "analysis")

    base = get_family(cfg.model.family).base_loss_name  # dit4sr: the noise loss
    print(f"[demo] done: {result.steps_done} steps in {t_train:.0f} s, final loss "
          f"{last.get('loss/total', float('nan')):.4f} ({base} {last.get(f'loss/{base}', float('nan')):.4f}, "
          f"framer {last.get('loss/framer', float('nan')):.4f})")
    print(f"[demo] checkpoint:       {result.checkpoint}")
    for kind, p in result.exports.items():
        print(f"[demo] export ({kind}):{' ' * max(1, 9 - len(kind))}{p}")
    print(f"[demo] TensorBoard logs: {result.log_dir}   (tensorboard --logdir {result.log_dir})")
    print(f"[demo] loss history:     {out / 'metrics.jsonl'}")
    print(f"[demo] upscaled photo:   {sr}  (bicubic | super-resolved)")
    print(f"[demo] layer hierarchy:  {plots['similarity']}  (Fig. 7: LF/HF cosine to the teacher per "
          f"layer, init vs trained)")
    print(f"[demo] FAW/FAM weights:  {plots['weights']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
