"""FRAMER_U step overhead: one pisasr training micro-batch with FRAMER on vs off, per stage.

For each stage (``pix``, ``sem``) one model is built as train.py builds it (the family's build,
trainable set and frozen helpers; backend ``none``) and the same fixed synthetic pixel batch runs
forward + backward of ``micro_batch_loss`` (what the trainer's step runs, without the optimizer)
with framer.enabled = true and = false, alternately: a warm-up, then turns in ABBA order of
``--block`` steps of each kind, so both see the same clocks and allocator state. The figures are
the median step times, their ratio (on / off) and the median of the per-turn ratios; on CUDA also
the peak allocated memory of each kind. CPU figures are ratios only (docs: bench/README.md).

Examples:
    python bench/framer_u_step.py --out bench/results/framer_u_cpu.json          # unet-tiny, CPU
    python bench/framer_u_step.py --preset sd2.1-base --resolution 512 --batch 4 --device cuda \\
        --out $OUT/framer_u_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py

from _common import package_versions, save_result  # noqa: E402
from framer_dist.config import Config, load_config  # noqa: E402
from framer_dist.framer import select_layers  # noqa: E402
from framer_dist.micro_batch import micro_batch_loss  # noqa: E402
from framer_dist.models import StepContext, get_family  # noqa: E402
from framer_dist.parallel import setup_backend  # noqa: E402

BASE_CONFIG = ROOT / "configs" / "tiny_pisasr_cpu.toml"
PROMPT_TOKENS = 77   # SD2.1's text length (the family's width: 16 in unet-tiny, 1024 in sd2.1-base)
KINDS = ("framer_on", "framer_off")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="unet-tiny", help="model.preset (unet-tiny, sd2.1-base)")
    p.add_argument("--resolution", type=int, default=128, help="HR pixels (a multiple of 32)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch")
    p.add_argument("--stages", default="pix,sem", help="comma list of pix,sem")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--vae", default="auto",
                   help="'tiny' (the family's tiny random VAE), 'sd' (a random VAE of SD2.1's "
                        "geometry: realistic encode/decode cost), or a local diffusers VAE folder; "
                        "auto = tiny for unet-tiny, sd otherwise")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each kind first")
    p.add_argument("--steps", type=int, default=10, help="timed turns of each kind (ABBA order)")
    p.add_argument("--block", type=int, default=3, help="consecutive steps per turn")
    p.add_argument("--seed", type=int, default=0, help="train.seed")
    p.add_argument("--out", default=None, help="JSON result path (the Markdown table is printed)")
    p.add_argument("overrides", nargs="*",
                   help="extra dotted config overrides (parallel.activation_checkpointing=\"all\")")
    return p.parse_args(argv)


# -- setup -------------------------------------------------------------------------------------

def sd_vae_folder(folder: str, seed: int = 0) -> str:
    """A random AutoencoderKL of SD2.1's VAE geometry saved in ``folder`` (for data.vae): the
    encode/decode cost of the real VAE without its weights."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            norm_num_groups=32, scaling_factor=0.18215)
    vae.save_pretrained(folder)
    return folder


def vae_setting(a: argparse.Namespace, scratch: str) -> str:
    """data.vae for --vae ('' = the family's tiny random VAE); ``scratch``: a temporary folder."""
    choice = a.vae if a.vae != "auto" else ("tiny" if a.preset == "unet-tiny" else "sd")
    if choice == "tiny":
        return ""
    return sd_vae_folder(scratch, a.seed) if choice == "sd" else choice


def make_config(a: argparse.Namespace, stage: str, vae: str) -> Config:
    """The tiny CPU config with the bench's geometry, stage and device; FRAMER on."""
    precision = a.precision or ("bf16" if a.device == "cuda" else "fp32")
    ov = [f'model.preset="{a.preset}"', f'train.mode="{stage}"', f"train.seed={a.seed}",
          f'train.device="{a.device}"', f'train.precision="{precision}"',
          f"data.resolution={a.resolution}", f"data.batch_size={a.batch}",
          f"data.prompt_len={PROMPT_TOKENS}", f'data.vae="{vae}"', 'parallel.backend="none"',
          "framer.enabled=true"]
    return load_config(BASE_CONFIG, ov + list(a.overrides))


def framer_off(cfg: Config) -> Config:
    return dataclasses.replace(cfg, framer=dataclasses.replace(cfg.framer, enabled=False))


def synthetic_batch(cfg: Config, batch: int, resolution: int, device: torch.device,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed pixels in [-1, 1] (``lr``: the upscaled LR image, ``hr``) and prompt embeddings of the
    family's width: the step skips its degradation and runs everything after it."""
    g = torch.Generator().manual_seed(seed)
    d, _ = get_family(cfg.model.family).text_dims(cfg)
    img = (batch, 3, resolution, resolution)
    out = {"lr": torch.rand(img, generator=g) * 2 - 1, "hr": torch.rand(img, generator=g) * 2 - 1,
           "prompt_embeds": torch.randn(batch, PROMPT_TOKENS, d, generator=g)}
    return {k: v.to(device) for k, v in out.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one stage ---------------------------------------------------------------------------------

def stage_runner(cfg: Config) -> tuple[Callable[[Config], tuple[float, float | None]], dict[str, Any]]:
    """Build the stage's model, helpers and batch; return one timed step (-> seconds, peak GiB on
    CUDA) and the stage's facts."""
    family = get_family(cfg.model.family)
    torch.manual_seed(cfg.train.seed)  # as train.py: the new layers' init
    model = family.build(cfg)
    params = family.trainable(model, cfg)
    students, teacher = select_layers(model.num_blocks, cfg.framer)
    backend = setup_backend(cfg, model, params)  # backend none: device, frozen bf16, AC, autocast
    device = backend.device
    helpers = family.helpers(model, cfg, device)
    batch = synthetic_batch(cfg, cfg.data.batch_size, cfg.data.resolution, device, cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    positions = list(range(cfg.data.batch_size))

    def step(c: Config) -> tuple[float, float | None]:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        ctx = StepContext(c, positions, backend.autocast(), helpers)
        loss = micro_batch_loss(family, backend.model, batch, ctx, students, teacher, gen,
                                gather=lambda t: t, rank=0)
        backend.backward(loss.total)
        loss.verify()
        _sync(device)
        seconds = time.perf_counter() - t0
        for p in params:  # no optimizer step: forward + backward only
            p.grad = None
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        return seconds, peak

    facts = {"trainable_params": sum(p.numel() for p in params),
             "students": len(students), "num_blocks": model.num_blocks,
             "resident_gib": (torch.cuda.memory_allocated(device) / 2**30
                              if device.type == "cuda" else None)}
    return step, facts


def time_stage(a: argparse.Namespace, stage: str, vae: str) -> dict[str, Any]:
    """Interleaved FRAMER on / off steps of one stage; medians and ratios."""
    cfg = make_config(a, stage, vae)
    configs = {"framer_on": cfg, "framer_off": framer_off(cfg)}
    step, facts = stage_runner(cfg)
    for _ in range(a.warmup):
        for kind in KINDS:
            step(configs[kind])
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    peaks: dict[str, list[float]] = {k: [] for k in KINDS}
    turn_ratios = []
    for i in range(a.steps):
        order = KINDS if i % 2 == 0 else KINDS[::-1]   # ABBA: neither kind always runs first
        turn: dict[str, list[float]] = {k: [] for k in KINDS}
        for kind in order:
            for _ in range(a.block):
                s, peak = step(configs[kind])
                turn[kind].append(s)
                if peak is not None:
                    peaks[kind].append(peak)
        for kind in KINDS:
            times[kind] += turn[kind]
        turn_ratios.append(statistics.median(turn["framer_on"]) / statistics.median(turn["framer_off"]))
    res: dict[str, Any] = {"stage": stage, **facts}
    for kind in KINDS:
        res[kind] = {"step_s_median": statistics.median(times[kind]), "step_s_all": times[kind],
                     "peak_mem_gib": max(peaks[kind]) if peaks[kind] else None}
    on, off = res["framer_on"], res["framer_off"]
    res["time_ratio"] = on["step_s_median"] / off["step_s_median"]
    res["time_ratio_turns_median"] = statistics.median(turn_ratios)
    res["mem_ratio"] = (on["peak_mem_gib"] / off["peak_mem_gib"]
                        if on["peak_mem_gib"] and off["peak_mem_gib"] else None)
    return res


# -- records -----------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's answer elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    versions = package_versions(("torch", "diffusers", "peft"))
    return {"device": device, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
            "versions": versions, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    dev = env["gpu"] or f"CPU {env['cpu_model']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads)"
    lines = [f"# FRAMER_U step: {result['preset']}, {result['resolution']} px, batch {result['batch']}",
             "", f"Device: {dev}; {', '.join(f'{k} {v}' for k, v in env['versions'].items())}; "
             f"{env['date']}; load average before {result['load_avg_before']}, after "
             f"{result['load_avg_after']}", "", f"Command: `{result['command']}`", "",
             "| stage | off s/step | on s/step | time ratio on/off | per-turn ratio (median) "
             "| off peak GiB | on peak GiB | mem ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in result["stages"]:
        on, off = r["framer_on"], r["framer_off"]
        lines.append(f"| {r['stage']} | {off['step_s_median']:.4f} | {on['step_s_median']:.4f} "
                     f"| {r['time_ratio']:.3f} | {r['time_ratio_turns_median']:.3f} "
                     f"| {_fmt(off['peak_mem_gib'], '.2f')} | {_fmt(on['peak_mem_gib'], '.2f')} "
                     f"| {_fmt(r['mem_ratio'], '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    before = load_average()
    with tempfile.TemporaryDirectory(prefix="framer_u_vae_") as scratch:
        vae = vae_setting(a, scratch)
        stages = [time_stage(a, s, vae) for s in a.stages.split(",")]
    result = {"benchmark": "framer_u_step", "preset": a.preset, "resolution": a.resolution,
              "batch": a.batch, "prompt_tokens": PROMPT_TOKENS, "vae": a.vae,
              "precision": a.precision or ("bf16" if a.device == "cuda" else "fp32"),
              "warmup": a.warmup, "turns": a.steps, "block": a.block,
              "environment": environment(a.device), "load_avg_before": before,
              "load_avg_after": load_average(),
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT)]
                                              + (argv if argv is not None else sys.argv[1:])),
              "stages": stages}
    md = markdown(result)
    print(md)
    save_result(result, a.out)
    return result


if __name__ == "__main__":
    main()
