"""``framer-sr``: super-resolve an image or a folder of images with a trained checkpoint.

    framer-sr in/ out/ --checkpoint runs/x/export/transformer --vae sd35m/ --text-encoders sd35m/
    framer-sr lr.png out/ --checkpoint ctrl.safetensors --base sd35m/ --prompt "a red car"

Every option and its default is in docs/inference.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from framer_dist.models import DEFAULT_FAMILY, get_family

from .io import InferenceError, list_images, read_image, to_tensor, to_uint8, write_image
from .loading import KINDS, WEIGHTS, load_transformer, load_vae
from .pipeline import InferenceOptions, SRPipeline
from .prompts import (NEGATIVE_PROMPT, POSITIVE_SUFFIX, CachedEmbeddings, HashedPromptEncoder,
                      caption_for, read_captions, text_encoder)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    d = InferenceOptions()
    p = argparse.ArgumentParser(prog="framer-sr",
                                description="Super-resolve an image or a folder of images with a "
                                            "trained FRAMER/DiT4SR checkpoint (docs/inference.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", help="an LR image or a folder of them")
    p.add_argument("output", help="output folder (one PNG per input, same stem)")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="full transformer folder, control-layer file or LoRA adapter (or a folder of exports)")
    g.add_argument("--kind", default="auto", choices=KINDS, help="checkpoint kind")
    g.add_argument("--weights", default=None, choices=WEIGHTS,
                   help="with a trainer export holding an EMA export (export/ema/, train.ema): "
                        "'ema' or 'main' (the last step's weights); default: EMA when present")
    g.add_argument("--base", default=None,
                   help="pretrained SD3/SD3.5 folder under a control/LoRA checkpoint; also the default "
                        "source of --vae, --text-encoders and the scheduler config")
    g.add_argument("--vae", default=None, help="diffusers VAE folder ('' = the project's tiny random VAE)")
    g.add_argument("--vae-tiling", action="store_true",
                   help="tiled VAE encode/decode (diffusers' enable_tiling) for very large images")
    g = p.add_argument_group("prompts")
    g.add_argument("--text-encoders", default=None,
                   help="SD3 folder with text_encoder(_2,_3) + tokenizers; 'hashed' = a fixed random "
                        "embedding per text (tiny test models only)")
    g.add_argument("--prompt-embeddings", default=None,
                   help="folder written by tools/encode_prompts.py (ids = image file names/stems; "
                        "optional negative.safetensors for the CFG branch, else the empty prompt)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="one caption for every image")
    src.add_argument("--captions", default=None, help="captions JSONL keyed by image file name/stem")
    src.add_argument("--llava", default=None, help="local LLaVA folder: caption each LR image")
    g.add_argument("--positive-suffix", default=POSITIVE_SUFFIX, help="appended to every caption")
    g.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="text of the unconditional branch")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--cfg", type=float, default=d.guidance, help="text guidance scale (1 = off)")
    g.add_argument("--scale", type=float, default=d.scale, help="upscale factor (any positive number)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--shift", type=float, default=d.shift, help="sigma shift without a scheduler config")
    g.add_argument("--process-size", type=int, default=d.process_size,
                   help="short side is raised to at least this before sampling, then resized back (0 = off)")
    g.add_argument("--tile", type=int, default=d.tile, help="latent tile side")
    g.add_argument("--tile-overlap", type=int, default=d.overlap, help="latent tile overlap")
    g.add_argument("--tile-batch", type=int, default=d.tile_batch, help="tiles per forward pass")
    g.add_argument("--color-fix", default=d.color_fix, choices=("adain", "wavelet", "none"))
    g.add_argument("--batch-size", type=int, default=1, help="images of equal size per batch")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _scheduler_config(base: str | None) -> dict | None:
    if not base:
        return None
    import json

    f = Path(base) / "scheduler" / "scheduler_config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _text_encoder(args, model, device, dtype):
    if args.prompt_embeddings:
        return None
    src = args.text_encoders
    if src is None and args.base and (Path(args.base) / "text_encoder").is_dir():
        src = args.base
    if src is None:
        raise InferenceError("no text encoders: pass --text-encoders DIR (an SD3/SD3.5 folder), "
                             "--prompt-embeddings PATH, or --text-encoders hashed for tiny test models")
    if src == "hashed":
        cfg = model.config
        return HashedPromptEncoder(cfg.joint_attention_dim, cfg.pooled_projection_dim)
    return text_encoder(get_family(DEFAULT_FAMILY), src, device=device, dtype=dtype)


def run(args: argparse.Namespace) -> list[Path]:
    images = list_images(args.input)
    out_dir = Path(args.output)
    if args.batch_size < 1:
        raise InferenceError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = DTYPES[args.dtype]
    captions = read_captions(args.captions) if args.captions else None  # fail early on a bad file
    model = load_transformer(args.checkpoint, kind=args.kind, base=args.base, device=device,
                             dtype=dtype, weights=args.weights,
                             report=lambda line: print(f"framer-sr: {line}", file=sys.stderr))
    vae_src = args.vae if args.vae is not None else (args.base or "")
    vae = load_vae(vae_src, device=device, dtype=dtype, tiling=args.vae_tiling)
    text = _text_encoder(args, model, device, dtype)
    cached = CachedEmbeddings(args.prompt_embeddings) if args.prompt_embeddings else None
    llava = None
    if args.llava:
        from framer_dist.data.captioning import LlavaCaptioner, ModelFolderError
        try:
            llava = LlavaCaptioner(args.llava, device=str(device), dtype=dtype)
        except ModelFolderError as e:
            raise InferenceError(str(e).replace("--model", "--llava")) from None
    opts = InferenceOptions(steps=args.steps, guidance=args.cfg, scale=args.scale, tile=args.tile,
                            overlap=args.tile_overlap, tile_batch=args.tile_batch,
                            color_fix=args.color_fix, process_size=args.process_size, seed=args.seed,
                            shift=args.shift, positive_suffix=args.positive_suffix,
                            negative_prompt=args.negative_prompt,
                            scheduler_config=_scheduler_config(args.base))
    pipe = SRPipeline(model, vae, text, opts, dtype=dtype)
    uncond = cached.uncond() if cached is not None and opts.guidance != 1.0 else None

    # read everything first: an unreadable image, a missing caption or embedding fails before
    # minutes of sampling
    lrs = [(f, read_image(f)) for f in images]
    conds = {f: cached.cond_for(f) for f in images} if cached is not None else {}
    given = {}
    if cached is None and llava is None:
        for f in images:
            given[f] = (args.prompt if args.prompt is not None else
                        caption_for(f, captions) if captions is not None else "")
    batches: list[list[tuple[Path, object]]] = []
    for f, img in lrs:
        if batches and len(batches[-1]) < args.batch_size and batches[-1][0][1].shape == img.shape:
            batches[-1].append((f, img))
        else:
            batches.append([(f, img)])

    from tqdm import tqdm

    bar = tqdm(total=len(images) * opts.steps, unit="step", disable=args.no_progress,
               desc="framer-sr", file=sys.stderr)
    written = []
    for batch in batches:
        files = [f for f, _ in batch]
        lr = torch.cat([to_tensor(img) for _, img in batch])
        bar.set_postfix_str(files[0].name if len(files) == 1 else f"{files[0].name} +{len(files) - 1}")
        n = len(files)
        step_cb = (lambda i, n=n: bar.update(n))  # noqa: E731
        if cached is not None:
            cond = (torch.cat([conds[f][0] for f in files]), torch.cat([conds[f][1] for f in files]))
            sr = pipe(lr, seed=args.seed, progress=step_cb, embeddings=(cond, uncond))
        else:
            if llava is not None:
                from PIL import Image

                from framer_dist.data.captioning import filter_sentences
                caps = [filter_sentences(c) for c in llava([Image.fromarray(img) for _, img in batch])]
            else:
                caps = [given[f] for f in files]  # "" = the positive suffix alone
            sr = pipe(lr, caps, seed=args.seed, progress=step_cb)
        for f, x in zip(files, sr):
            dst = out_dir / f"{f.stem}.png"
            write_image(dst, to_uint8(x))
            written.append(dst)
    bar.close()
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = run(args)
    except InferenceError as e:
        print(f"framer-sr: error: {e}", file=sys.stderr)
        return 2
    print(f"framer-sr: wrote {len(written)} image(s) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
