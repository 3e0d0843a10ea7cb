#!/usr/bin/env python
"""PSNR/SSIM (Y channel, border crop) and pyiqa metrics of SR results; see framer_dist/evaluate.py.

    python tools/evaluate.py --pred FRAMER=out/ --gt hr/ --dataset RealSR --out eval/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framer_dist.evaluate import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
