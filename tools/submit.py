#!/usr/bin/env python
"""Submit FRAMER training with submitit: SLURM by default, this machine with --local.

    python tools/submit.py --config configs/sd35m_framer.toml --nodes 4 --constraint h200 ...
    python tools/submit.py --help

The logic lives in framer_dist/launch.py; docs/launch.md is the guide.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from framer_dist.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
