#!/usr/bin/env python
"""The paper's Fig. 7 (per-layer LF/HF similarity to the final layer) and Fig. 9 (FAW/FAM weights
over layers) for one or more checkpoints; see framer_dist/analysis.py.

    python tools/analyze_hierarchy.py --checkpoint baseline=runs/base/export/transformer \
        --checkpoint FRAMER=runs/framer/export/transformer --vae sd35m/ --out hierarchy/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framer_dist.analysis import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
