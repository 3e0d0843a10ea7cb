"""``framer-sr``: super-resolve an image or a folder of images with a trained checkpoint.

    framer-sr in/ out/ --checkpoint runs/x/export/transformer --vae sd35m/ --text-encoders sd35m/
    framer-sr lr.png out/ --checkpoint ctrl.safetensors --base sd35m/ --prompt "a red car"

The model family (its checkpoint kinds, latents, text encoder and sampler) comes from the
export's record (``family.json``) or ``--family``. Every option and its default is in
docs/inference.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from framer_dist.models import ModelFamily, families

from .io import InferenceError, list_images, read_image, to_tensor, to_uint8, write_image
from .loading import WEIGHTS, checkpoint_family, kinds, load_model, load_vae
from .pipeline import InferenceOptions, SRPipeline
from .prompts import (NEGATIVE_PROMPT, POSITIVE_SUFFIX, CachedEmbeddings, HashedPromptEncoder,
                      caption_for, read_captions, text_encoder)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# InferenceOptions field -> the flag's dest (a family's defaults apply where the flag is not given)
OPTION_FLAGS = {"steps": "steps", "guidance": "cfg", "scale": "scale", "tile": "tile",
                "overlap": "tile_overlap", "tile_batch": "tile_batch", "color_fix": "color_fix",
                "process_size": "process_size", "seed": "seed", "shift": "shift",
                "positive_suffix": "positive_suffix", "negative_prompt": "negative_prompt"}


def build_parser() -> argparse.ArgumentParser:
    d = InferenceOptions()
    p = argparse.ArgumentParser(prog="framer-sr",
                                description="Super-resolve an image or a folder of images with a "
                                            "trained FRAMER checkpoint (docs/inference.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", help="an LR image or a folder of them")
    p.add_argument("output", help="output folder (one PNG per input, same stem)")
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="a trainer export (its folder, or one export in it: dit4sr's full transformer "
                        "folder, control-layer file or LoRA adapter; pisasr's merged unet/ or "
                        "pisasr_lora.safetensors)")
    g.add_argument("--kind", default="auto", choices=kinds(), help="checkpoint kind")
    g.add_argument("--family", default=None,
                   help="model family of the checkpoint; default: the one its export records "
                        "(export/family.json), else the default family")
    g.add_argument("--weights", default=None, choices=WEIGHTS,
                   help="with a trainer export holding an EMA export (export/ema/, train.ema): "
                        "'ema' or 'main' (the last step's weights); default: EMA when present")
    g.add_argument("--base", default=None,
                   help="the pretrained diffusers folder under an adapter checkpoint (dit4sr: SD3/SD3.5 "
                        "under a control/LoRA checkpoint; pisasr: SD2.1-base under its LoRA file); also the default source of --vae, "
                        "--text-encoders and the scheduler config")
    g.add_argument("--vae", default=None, help="diffusers VAE folder ('' = the family's tiny random VAE)")
    g.add_argument("--vae-tiling", action="store_true",
                   help="tiled VAE encode/decode (diffusers' enable_tiling) for very large images")
    g = p.add_argument_group("prompts")
    g.add_argument("--text-encoders", default=None,
                   help="diffusers folder with the family's text encoder(s) + tokenizer(s) (dit4sr: "
                        "SD3's text_encoder(_2,_3); pisasr: SD2.1's text_encoder); 'hashed' = a fixed random embedding per text "
                        "(tiny test models only)")
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
    for fam in families():  # each family's own flags (values reach its sampler)
        if fam.inference is not None and fam.inference.arguments:
            g = p.add_argument_group(f"{fam.name} sampling")
            for flags, kw in fam.inference.arguments:
                g.add_argument(*flags, **kw)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, plus ``explicit``: the dests given on the command line (a family's defaults
    replace the others)."""
    args = build_parser().parse_args(argv)
    unset = object()  # a default no flag can produce (not a str: argparse converts those)
    probe = build_parser()
    probe.set_defaults(**dict.fromkeys(vars(args), unset))
    args.explicit = frozenset(k for k, v in vars(probe.parse_args(argv)).items() if v is not unset)
    return args


def options(args: argparse.Namespace, family: ModelFamily) -> InferenceOptions:
    """InferenceOptions from the flags, the family's defaults for flags not given, and the
    family's own flags (``family_options``)."""
    explicit = getattr(args, "explicit", frozenset())
    values = {f: getattr(args, dest) for f, dest in OPTION_FLAGS.items()}
    for f, v in family.inference.defaults.items():
        if OPTION_FLAGS.get(f) not in explicit:
            values[f] = v
    dests = [argparse.ArgumentParser(add_help=False).add_argument(*flags, **kw).dest
             for flags, kw in family.inference.arguments]
    return InferenceOptions(**values, scheduler_config=_scheduler_config(args.base),
                            family_options={k: getattr(args, k) for k in dests})


def _scheduler_config(base: str | None) -> dict | None:
    if not base:
        return None
    import json

    f = Path(base) / "scheduler" / "scheduler_config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _text_encoder(args, family: ModelFamily, model, device, dtype):
    if args.prompt_embeddings:
        return None
    src = args.text_encoders
    if src is None and args.base and (Path(args.base) / "text_encoder").is_dir():
        src = args.base
    if src is None:
        raise InferenceError("no text encoders: pass --text-encoders DIR (a diffusers folder with the "
                             "family's text encoders), --prompt-embeddings PATH, or --text-encoders "
                             "hashed for tiny test models")
    if src == "hashed":
        return HashedPromptEncoder(*family.inference.shape(model).text_dims)
    return text_encoder(family, src, device=device, dtype=dtype)


def run(args: argparse.Namespace) -> list[Path]:
    images = list_images(args.input)
    out_dir = Path(args.output)
    if args.batch_size < 1:
        raise InferenceError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = DTYPES[args.dtype]
    captions = read_captions(args.captions) if args.captions else None  # fail early on a bad file
    family = checkpoint_family(args.checkpoint, args.family)
    model = load_model(args.checkpoint, kind=args.kind, base=args.base, device=device,
                       dtype=dtype, weights=args.weights, family=family,
                       report=lambda line: print(f"framer-sr: {line}", file=sys.stderr))
    vae_src = args.vae if args.vae is not None else (args.base or "")
    vae = load_vae(vae_src, device=device, dtype=dtype, tiling=args.vae_tiling,
                   codec=family.part("latents"))
    text = _text_encoder(args, family, model, device, dtype)
    cached = CachedEmbeddings(args.prompt_embeddings) if args.prompt_embeddings else None
    llava = None
    if args.llava:
        from framer_dist.data.captioning import LlavaCaptioner, ModelFolderError
        try:
            llava = LlavaCaptioner(args.llava, device=str(device), dtype=dtype)
        except ModelFolderError as e:
            raise InferenceError(str(e).replace("--model", "--llava")) from None
    opts = options(args, family)
    pipe = SRPipeline(model, vae, text, opts, dtype=dtype, family=family)
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
            sr = pipe(lr, seed=opts.seed, progress=step_cb, embeddings=(cond, uncond))
        else:
            if llava is not None:
                from PIL import Image

                from framer_dist.data.captioning import filter_sentences
                caps = [filter_sentences(c) for c in llava([Image.fromarray(img) for _, img in batch])]
            else:
                caps = [given[f] for f in files]  # "" = the positive suffix alone
            sr = pipe(lr, caps, seed=opts.seed, progress=step_cb)
        for f, x in zip(files, sr):
            dst = out_dir / f"{f.stem}.png"
            write_image(dst, to_uint8(x))
            written.append(dst)
    bar.close()
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from framer_dist.models import ModelLoadError
    try:
        written = run(args)
    except (InferenceError, ModelLoadError) as e:  # a family's sampler refuses options this way
        print(f"framer-sr: error: {e}", file=sys.stderr)
        return 2
    print(f"framer-sr: wrote {len(written)} image(s) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
