"""Training-step benchmark: FRAMER step vs. the model family's baseline step, img/s, MFU, peak memory.

One process, synthetic latents and prompt embeddings at the model's real shapes (no data
pipeline). For each (mode, backend) combination the same model, optimizer and batch run
baseline steps (framer.enabled=false: no readout, no FRAMER loss) and FRAMER steps alternately
(ABBA order, after warm-up), so both see the same clocks, allocator state and thermal state; the
figures are medians. Peak memory is read per step type (CUDA only: reset_peak_memory_stats before
each step). MFU uses the family's FLOP count (ModelFamily.flops; dit4sr: framer_dist/models/dit4sr/flops.py,
documented there): useful model FLOPs / step time / peak. The model is built as train.py builds it
(on the CPU; the backend moves it).

Examples:
    python bench/train_step.py --preset tiny --batch 2 --resolution 64 --steps 4    # CPU smoke
    python bench/train_step.py --preset sd3.5-medium --batch 16 --resolution 512 \\
        --modes control,lora,full --backends none,zero3,fsdp2 --ac all --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py

from _common import package_versions, save_result  # noqa: E402
from framer_dist.config import Config, load_config  # noqa: E402
from framer_dist.flops import peak_flops  # noqa: E402
from framer_dist.framer import select_layers  # noqa: E402
from framer_dist.micro_batch import micro_batch_loss  # noqa: E402
from framer_dist.models import DEFAULT_FAMILY, StepContext, get_family  # noqa: E402
from framer_dist.parallel import setup_backend  # noqa: E402
from framer_dist.parallel.blocks import ac_indices  # noqa: E402

# Step phases timed on the GPU timeline (CUDA events): model forward + both losses, backward,
# optimizer step (with clipping)
PHASES = ("forward_loss", "backward", "optimizer")
BACKENDS = {"none": ("none", ""), "zero3": ("deepspeed", "ds_configs/zero3.json"),
            "zero2": ("deepspeed", "ds_configs/zero2.json"), "fsdp2": ("fsdp2", "")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default=DEFAULT_FAMILY, help="model family (model.family)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--modes", default="control", help="comma list of control,lora,full")
    p.add_argument("--backends", default="none", help=f"comma list of {','.join(BACKENDS)}")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64, help="pixels; latent = resolution / 8")
    p.add_argument("--text-tokens", type=int, default=None, help="default 154 (77 CLIP + 77 T5); tiny: 8")
    p.add_argument("--ac", default="none", choices=["none", "all", "every_k", "blocks"])
    p.add_argument("--ac-blocks", default="", help="with --ac blocks: comma list of block indices to checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument("--ds-config", default=None,
                   help="DeepSpeed JSON for the zero3 runs (default ds_configs/zero3.json); each ZeRO-3 "
                        "run also counts its parameter fetches and all-gathers over one step of each kind")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    p.add_argument("--steps", type=int, default=10, help="turns of each kind (ABBA order)")
    p.add_argument("--block", type=int, default=1,
                   help="consecutive steps per turn; with > 1 the first of each turn is not timed, "
                        "since a change of module order makes ZeRO-3 re-record its prefetch trace")
    p.add_argument("--skip", type=int, default=1,
                   help="with --block > 1: untimed steps at the start of each turn (ZeRO-3 needs 2 to be "
                        "steady: the first drops its prefetch trace, the second re-records it)")
    p.add_argument("--profile", default=None,
                   help="also profile 2 steps of each kind with torch.profiler; write the kernel table here")
    p.add_argument("--out", default=None, help="JSON result path (a .md summary is written beside)")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides (framer.use_rfft=false)")
    return p.parse_args(argv)


def make_config(a: argparse.Namespace, mode: str, backend: str, device: str) -> Config:
    name, ds_json = BACKENDS[backend]
    precision = a.precision or ("bf16" if device == "cuda" else "fp32")
    ov = [f"model.family=\"{a.family}\"", f"model.preset=\"{a.preset}\"", f"train.mode=\"{mode}\"",
          f"parallel.backend=\"{name}\"",
          f"train.precision=\"{precision}\"", f"data.batch_size={a.batch}",
          f"data.resolution={a.resolution}", f"parallel.activation_checkpointing=\"{a.ac}\"",
          f"parallel.compile={'true' if a.compile else 'false'}", f"train.device=\"{device}\"",
          f"train.optimizer=\"{a.optimizer}\"", "framer.enabled=true"]
    if ds_json:
        if backend == "zero3" and a.ds_config:
            ds_json = a.ds_config
        ov.append(f"parallel.ds_config=\"{(ROOT / ds_json).resolve()}\"")
    if a.ac == "blocks":
        ov.append(f"parallel.ac_blocks=[{a.ac_blocks}]")
    return load_config(None, ov + list(a.overrides))


def synthetic_batch(cfg: Config, batch: int, resolution: int, text_tokens: int,
                    device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random latents and prompt embeddings of the family's shapes (its latent channels and text
    widths)."""
    family = get_family(cfg.model.family)
    g = torch.Generator().manual_seed(seed)
    c = family.part("latents").channels
    d, p = family.text_dims(cfg)
    hw = resolution // 8
    shapes = {"hr_latent": (batch, c, hw, hw), "lr_latent": (batch, c, hw, hw),
              "prompt_embeds": (batch, text_tokens, d), "pooled": (batch, p)}
    return {k: torch.randn(s, generator=g).to(device) for k, s in shapes.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_combo(a: argparse.Namespace, mode: str, backend_key: str, device_type: str) -> dict[str, Any]:
    cfg = make_config(a, mode, backend_key, device_type)
    base_cfg = dataclasses.replace(cfg, framer=dataclasses.replace(cfg.framer, enabled=False))
    family = get_family(cfg.model.family)
    torch.manual_seed(0)
    model = family.build(cfg)
    params = family.trainable(model, cfg)
    students, teacher = select_layers(model.num_blocks, cfg.framer)
    # per-sample FLOPs of each step kind, counted on the plain model (before the backend shards it)
    flops_of = {"baseline": family.flops(model, base_cfg), "framer": family.flops(model, cfg)}
    text_tokens = a.text_tokens or (154 if a.preset != "tiny" else 8)
    backend = setup_backend(cfg, model, params)
    device = backend.device
    batch = synthetic_batch(cfg, a.batch, a.resolution, text_tokens, device)
    gen = torch.Generator().manual_seed(0)
    positions = list(range(a.batch))  # sigma and noise are drawn from these inside the step

    def one_step(c: Config) -> tuple[float, float | None, dict[str, float]]:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            # GPU-timeline marks between the phases: idle gaps (a host sync, launch-bound
            # stretches) count toward the phase they fall in
            marks = [torch.cuda.Event(enable_timing=True) for _ in PHASES + ("start",)]
        _sync(device)
        t0 = time.perf_counter()
        if cuda:
            marks[-1].record()
        losses = micro_batch_loss(family, backend.model, batch,
                                  StepContext(c, positions, backend.autocast()), students, teacher,
                                  gen, gather=backend.gather, rank=backend.rank)
        if cuda:
            marks[0].record()
        backend.backward(losses.total)
        losses.verify()
        if cuda:
            marks[1].record()
        backend.step()
        if cuda:
            marks[2].record()
        _sync(device)
        dt_s = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        phases = {}
        if cuda:
            prev = marks[-1]
            for name, m in zip(PHASES, marks):
                phases[name] = prev.elapsed_time(m)
                prev = m
        return dt_s, mem, phases

    times: dict[str, list[float]] = {"baseline": [], "framer": []}
    mems: dict[str, list[float]] = {"baseline": [], "framer": []}
    phase_ms: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PHASES} for k in times}
    for _ in range(a.warmup):
        one_step(base_cfg)
        one_step(cfg)
    for i in range(a.steps):  # turns in ABBA order: neither kind always runs first
        order = (("baseline", base_cfg), ("framer", cfg)) if i % 2 == 0 else \
                (("framer", cfg), ("baseline", base_cfg))
        for kind, c in order:
            for j in range(a.block):
                t, m, ph = one_step(c)
                if a.block > 1 and j < a.skip:
                    continue  # the first steps after a switch re-trace (ZeRO-3 prefetch order)
                times[kind].append(t)
                for name, v in ph.items():
                    phase_ms[kind][name].append(v)
                if m is not None:
                    mems[kind].append(m)

    fetches = None
    if getattr(backend, "stage", None) == 3:  # DeepSpeed ZeRO-3: what one step fetches
        from framer_dist.parallel.deepspeed.instrument import zero3_fetch_counter
        fetches = {}
        for kind, c in (("baseline", base_cfg), ("framer", cfg)):
            for _ in range(2):  # after a change of step kind ZeRO-3 drops its trace, then re-records it
                one_step(c)
            with zero3_fetch_counter() as counts:
                one_step(c)
            fetches[kind] = dict(counts)

    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        kernels = {}
        with open(a.profile, "a") as fh:
            for kind, c in (("baseline", base_cfg), ("framer", cfg)):
                with profile(activities=acts) as prof:
                    one_step(c)
                    one_step(c)
                fh.write(f"## {mode} / {backend_key} / {kind} (2 steps)\n")
                fh.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
                fh.write("\n")
                kernels[kind] = device_kernel_times(prof)
            fh.write(kernel_diff_table(kernels["baseline"], kernels["framer"], f"{mode} / {backend_key}"))

    precision = cfg.train.precision
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", precision)
    res: dict[str, Any] = {"mode": mode, "backend": backend_key, "precision": precision,
                           "batch": a.batch, "resolution": a.resolution, "text_tokens": text_tokens,
                           "activation_checkpointing": a.ac,
                           "checkpointed_blocks": len(ac_indices(cfg.parallel, model.num_blocks)),
                           "compile": a.compile, "block": a.block, "skip": a.skip if a.block > 1 else 0,
                           "trainable_params": sum(p.numel() for p in params),
                           "total_params": sum(p.numel() for p in model.parameters())}
    if cfg.parallel.backend == "deepspeed":
        res["ds_config"] = os.path.relpath(cfg.parallel.ds_config, ROOT)
    if fetches is not None:
        res["zero3"] = {"fetches_per_step": fetches, "leaf_modules": len(backend.zero3_leaves),
                        "persistent_head_numel": backend.zero3_persistent_numel}
    for kind in ("baseline", "framer"):
        med = statistics.median(times[kind])
        flops = flops_of[kind](batch) if flops_of[kind] is not None else None  # None: not counted
        res[kind] = {"step_s_median": med, "step_s_all": times[kind], "img_per_s": a.batch / med,
                     "model_tflop_per_step": flops * a.batch / 1e12 if flops is not None else None,
                     "mfu": (flops * a.batch / med / peak) if peak and flops is not None else None,
                     "peak_mem_gib": max(mems[kind]) if mems[kind] else None,
                     "phase_ms_median": {p: statistics.median(v) for p, v in phase_ms[kind].items() if v}}
    b, f = res["baseline"], res["framer"]
    res["framer_time_overhead"] = f["step_s_median"] / b["step_s_median"] - 1.0
    res["framer_mem_overhead"] = (f["peak_mem_gib"] / b["peak_mem_gib"] - 1.0
                                  if b["peak_mem_gib"] else None)
    del backend, model, params, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def device_kernel_times(prof: Any) -> dict[str, tuple[float, int]]:
    """Self device time (us) and launch count per kernel name of a profile (CUDA kernels only)."""
    out = {}
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).endswith("CUDA") and e.self_device_time_total > 0:
            out[e.key] = (e.self_device_time_total, e.count)
    return out


def kernel_diff_table(base: dict[str, tuple[float, int]], framer: dict[str, tuple[float, int]],
                      title: str, rows: int = 30) -> str:
    """Where FRAMER's extra GPU time goes: per kernel, FRAMER minus baseline (2 profiled steps each)."""
    names = set(base) | set(framer)
    diff = sorted(((framer.get(n, (0, 0))[0] - base.get(n, (0, 0))[0],
                    framer.get(n, (0, 0))[1] - base.get(n, (0, 0))[1], n) for n in names), reverse=True)
    tot_b = sum(v[0] for v in base.values())
    tot_f = sum(v[0] for v in framer.values())
    lines = [f"## {title}: FRAMER - baseline, GPU kernel time over 2 steps",
             f"total kernel time: baseline {tot_b / 1e3:.1f} ms, FRAMER {tot_f / 1e3:.1f} ms, "
             f"difference {(tot_f - tot_b) / 1e3:+.1f} ms", "", "| delta ms | delta launches | kernel |",
             "|---|---|---|"]
    for d, dn, n in diff[:rows]:
        lines.append(f"| {d / 1e3:+.2f} | {dn:+d} | {n[:110]} |")
    lines.append(f"| ... | | ({len(diff) - rows} more; most negative below) |")
    for d, dn, n in diff[-5:]:
        lines.append(f"| {d / 1e3:+.2f} | {dn:+d} | {n[:110]} |")
    return "\n".join(lines) + "\n\n"


def environment() -> dict[str, Any]:
    versions = package_versions(("torch", "deepspeed", "diffusers", "transformers", "peft"))
    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    return {"device": dev, "versions": versions, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# Train-step benchmark: {result['preset']}", "",
             f"Device: {env['device']}; {', '.join(f'{k} {v}' for k, v in env['versions'].items())}; "
             f"{env['date']}", "", f"Command: `{result['command']}`", "",
             "| mode | backend | AC | base s/step | FRAMER s/step | time overhead | base GiB | FRAMER GiB "
             "| mem overhead | base img/s | FRAMER img/s | base MFU | FRAMER MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['backend']} | | error: {r['error']} |||||||||")
            continue
        b, f = r["baseline"], r["framer"]
        lines.append(
            f"| {r['mode']} | {r['backend']} | {r['activation_checkpointing']}"
            f"{' (' + str(r['checkpointed_blocks']) + ')' if 'checkpointed_blocks' in r else ''} "
            f"| {b['step_s_median']:.4f} | {f['step_s_median']:.4f} | {r['framer_time_overhead']:+.2%} "
            f"| {_fmt(b['peak_mem_gib'], '.2f')} | {_fmt(f['peak_mem_gib'], '.2f')} "
            f"| {_fmt(r['framer_mem_overhead'], '+.2%')} | {b['img_per_s']:.2f} | {f['img_per_s']:.2f} "
            f"| {_fmt(b['mfu'], '.1%')} | {_fmt(f['mfu'], '.1%')} |")
    phased = [r for r in result["runs"] if r.get("baseline", {}).get("phase_ms_median")]
    if phased:
        lines += ["", "GPU time per phase (CUDA events, medians, ms): baseline -> FRAMER", "",
                  "| mode | backend | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
        for r in phased:
            b, f = r["baseline"]["phase_ms_median"], r["framer"]["phase_ms_median"]
            lines.append(f"| {r['mode']} | {r['backend']} | " + " | ".join(
                f"{b[p]:.1f} -> {f[p]:.1f} ({f[p] - b[p]:+.1f})" for p in PHASES) + " |")
    z3 = [r for r in result["runs"] if "zero3" in r]
    if z3:
        lines += ["", "ZeRO-3 coordinator work in one step (baseline -> FRAMER): hook fetch requests, "
                  "coalesced all-gathers, parameters gathered", "",
                  "| mode | backend | DeepSpeed JSON | leaf modules | persistent head numel | hook fetches "
                  "| all-gathers | params gathered |", "|---|---|---|---|---|---|---|---|"]
        for r in z3:
            b, f = r["zero3"]["fetches_per_step"]["baseline"], r["zero3"]["fetches_per_step"]["framer"]
            lines.append(f"| {r['mode']} | {r['backend']} | {r.get('ds_config', '')} | {r['zero3']['leaf_modules']} "
                         f"| {r['zero3']['persistent_head_numel']} | "
                         + " | ".join(f"{b[k]} -> {f[k]}" for k in ("hook_fetches", "allgathers", "params_gathered"))
                         + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # The distributed backends run here as a one-rank process group.
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        os.environ.setdefault(k, v)
    runs = []
    for backend_key in a.backends.split(","):
        if backend_key not in BACKENDS:
            raise SystemExit(f"--backends: unknown backend {backend_key!r}; allowed: {', '.join(BACKENDS)}")
        for mode in a.modes.split(","):
            try:
                r = run_combo(a, mode, backend_key, device_type)
            except torch.OutOfMemoryError as e:  # record it; the other combinations still run
                r = {"mode": mode, "backend": backend_key, "error": f"out of memory: {str(e)[:120]}"}
                gc.collect()
                torch.cuda.empty_cache()
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("baseline", "framer")}
                             | {"base_s": r.get("baseline", {}).get("step_s_median"),
                                "framer_s": r.get("framer", {}).get("step_s_median")}), flush=True)
    result = {"benchmark": "train_step", "preset": a.preset, "environment": environment(),
              "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
              "runs": runs}
    md = markdown(result)
    print(md)
    save_result(result, a.out, md)
    return result


if __name__ == "__main__":
    main()
