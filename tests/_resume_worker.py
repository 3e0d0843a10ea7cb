"""Resume several checkpoints in one process with the real trainer (``framer_dist.train.main``):
one process (and, for the distributed backends, one process group) for many resumes, which keeps
the planted-pickle tests short. Run as rank 0 of a 1-rank job (the test sets the env torchrun
would). Usage: _resume_worker.py SPEC.json; SPEC: {"argv": [...], "runs": [[checkpoint, out_dir],
...], "result": path}. Writes, per run: the exit code, the ``framer-train: error:`` lines and any
traceback that escaped main."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

from framer_dist.train import main

spec = json.loads(open(sys.argv[1]).read())
results = []
for checkpoint, out_dir in spec["runs"]:
    err = io.StringIO()
    escaped = None
    with contextlib.redirect_stderr(err):
        try:
            rc = main([*spec["argv"], "--resume", checkpoint, f"train.out_dir={json.dumps(out_dir)}"])
        except BaseException:  # what main let through: the test reports it
            rc, escaped = -1, traceback.format_exc()
    lines = err.getvalue().splitlines()
    results.append({"checkpoint": checkpoint, "rc": rc, "escaped": escaped,
                    "errors": [ln for ln in lines if ln.startswith("framer-train: error:")],
                    "tracebacks": sum("Traceback (most recent call last)" in ln for ln in lines)})
    with open(spec["result"], "w") as fh:  # after every run: a hang still leaves what finished
        json.dump(results, fh, indent=1)
