#!/usr/bin/env python
"""PiSA-SR's released checkpoint (its torch.save dict) -> a pisasr LoRA export folder.

  python tools/import_pisasr.py pisa_sr.pkl --out runs/pisasr_release [--preset sd2.1-base]

Then: framer-sr --checkpoint runs/pisasr_release --base models/stable-diffusion-2-1-base ...
(PiSA-SR itself, for the baseline row), or pisasr.init_from = "runs/pisasr_release" (FRAMER_U
started from it; the FRAMER heads start fresh). Loaded with weights_only=True: nothing in the file
runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from framer_dist.models import ModelLoadError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from framer_dist.models.pisasr.presets import PRESETS
    from framer_dist.models.pisasr.release import import_release

    ap = argparse.ArgumentParser(prog="tools/import_pisasr.py", description=__doc__.splitlines()[0])
    ap.add_argument("release", help="PiSA-SR's released checkpoint (e.g. pisa_sr.pkl)")
    ap.add_argument("--out", required=True, help="output folder (pisasr_lora.safetensors, family.json)")
    ap.add_argument("--preset", default="sd2.1-base", choices=list(PRESETS))
    a = ap.parse_args(argv)
    try:
        f = import_release(a.release, a.preset, a.out)
    except ModelLoadError as e:
        print(f"import_pisasr: error: {e}", file=sys.stderr)
        return 2
    print(f"import_pisasr: wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
