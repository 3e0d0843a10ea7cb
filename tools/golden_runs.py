"""Record short training runs of one commit and compare two recordings bit for bit.

A refactor that promises "no change in behaviour" (the model-family seam) is checked with it:

    python tools/golden_runs.py record --commit main~3 --out /tmp/golden/before
    python tools/golden_runs.py record --commit HEAD   --out /tmp/golden/after
    python tools/golden_runs.py compare /tmp/golden/before /tmp/golden/after

``record`` checks the commit out into a temporary git worktree and runs its own
``framer_dist/train.py`` there (with this interpreter and its packages) on the tiny config, fp32,
synthetic data, 4 steps, global batch 4: backend ``none`` (1 process), FSDP2 and DeepSpeed
ZeRO-3 (2 ranks each, torchrun) in the ``control``, ``lora`` and ``full`` modes (``--runs``
picks a subset). It keeps each run's ``metrics.jsonl`` and ``export/`` folder. ``compare``
requires every logged value of every step and every exported tensor (name, dtype, shape, bits)
to be identical, and lists what differs. The recordings are for one machine: CI does not keep or
compare them (other CPUs round differently).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("none", "fsdp2", "zero3")
MODES = ("control", "lora", "full")
EXPORTS = {"control": ["control", "diffusers"], "lora": ["lora", "diffusers"], "full": ["diffusers"]}
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(tree: Path, backend: str, mode: str, out: Path) -> list[str]:
    args = ["--config", str(tree / "configs" / "tiny_cpu_demo.toml"), 'data.source="synthetic"',
            "data.resolution=32", "data.batch_size=2", "train.global_batch_size=4",
            f"train.steps={STEPS}", f'train.mode="{mode}"', 'train.precision="fp32"',
            'train.device="cpu"', "log.every=1", "log.heatmap_every=0", "log.val_every=0",
            "log.progress=false", "checkpoint.every=0", f"checkpoint.export={json.dumps(EXPORTS[mode])}",
            f"train.out_dir={json.dumps(str(out))}"]
    train = str(tree / "framer_dist" / "train.py")
    if backend == "none":
        return [sys.executable, train, *args]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), train]
    if backend == "fsdp2":
        return [*run, "--backend", "fsdp2", *args]
    # blocks as leaves, named: commits before the leaf classes came from the model read them from
    # the JSON (later ones keep a JSON's own entry, the same leaves); tiny params partitioned
    ds = out.parent / f"{out.name}_zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0,
        "leaf_module": {"classes": ["DiT4SRBlock"]}}}))
    return [*run, "--ds", str(ds), *args]


def record(commit: str, out: Path, runs: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", commit], check=True,
                         capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), sha],
                       check=True, capture_output=True)
        try:
            for name in runs:
                backend, mode = name.split("-")
                work = Path(tmp) / name
                env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1",
                           FRAMER_NO_PROGRESS="1", PYTHONWARNINGS="ignore")
                print(f"[golden] {sha[:10]} {name}", flush=True)
                with open(out / f"{name}.log", "w") as log:
                    rc = subprocess.run(_command(tree, backend, mode, work), cwd=tree, env=env,
                                        stdout=log, stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    sys.exit(f"golden_runs: {name} failed with exit code {rc}; see {out / name}.log")
                shutil.rmtree(out / name, ignore_errors=True)
                (out / name).mkdir()
                shutil.copy(work / "metrics.jsonl", out / name / "metrics.jsonl")
                shutil.copytree(work / "export", out / name / "export")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)
    (out / "recording.json").write_text(json.dumps({"commit": sha, "runs": runs}, indent=1))


def _tensors(folder: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    out: dict[str, object] = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


def compare(a: Path, b: Path) -> list[str]:
    """What differs between two recordings (empty: bit-identical)."""
    import torch

    ra, rb = (json.loads((p / "recording.json").read_text()) for p in (a, b))
    problems = []
    if ra["runs"] != rb["runs"]:
        problems.append(f"different run lists: {ra['runs']} vs {rb['runs']}")
    for name in (n for n in ra["runs"] if n in rb["runs"]):
        ma, mb = ((p / name / "metrics.jsonl").read_text().splitlines() for p in (a, b))
        if [json.loads(x) for x in ma] != [json.loads(x) for x in mb]:
            diff = next(i for i, (x, y) in enumerate(zip(ma + [""], mb + [""])) if x != y)
            problems.append(f"{name}: metrics differ from line {diff + 1}")
        ta, tb = _tensors(a / name / "export"), _tensors(b / name / "export")
        if set(ta) != set(tb):
            problems.append(f"{name}: exported tensors differ in names: only in A "
                            f"{sorted(set(ta) - set(tb))[:5]}, only in B {sorted(set(tb) - set(ta))[:5]}")
        bad = [k for k in sorted(set(ta) & set(tb))
               if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape  # type: ignore[attr-defined]
               or not torch.equal(ta[k], tb[k])]  # type: ignore[arg-type]
        if bad:
            problems.append(f"{name}: {len(bad)} exported tensors differ, e.g. {bad[:3]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run the golden runs of one commit")
    r.add_argument("--commit", required=True, help="any git revision of this repository")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--runs", nargs="*", default=[f"{b}-{m}" for b in BACKENDS for m in MODES],
                   help="BACKEND-MODE names (default: all nine)")
    c = sub.add_parser("compare", help="compare two recordings bit for bit")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "record":
        bad = [n for n in args.runs if n.count("-") != 1 or n.split("-")[0] not in BACKENDS
               or n.split("-")[1] not in MODES]
        if bad:
            p.error(f"--runs: unknown {bad}; names are BACKEND-MODE with BACKEND in {BACKENDS} "
                    f"and MODE in {MODES}")
        record(args.commit, args.out, args.runs)
        return 0
    problems = compare(args.a, args.b)
    for line in problems:
        print(f"DIFFERS {line}")
    if not problems:
        print(f"bit-identical: {', '.join(json.loads((args.a / 'recording.json').read_text())['runs'])}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
