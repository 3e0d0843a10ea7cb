"""Peak accelerator throughput for MFU; each model family counts its own FLOPs (e.g.
``framer_dist/models/dit4sr/flops.py``)."""

from __future__ import annotations

# Dense peak throughput (FLOP/s) by device name fragment and dtype, from vendor datasheets.
_PEAK = {
    ("H200", "bf16"): 989e12, ("H100", "bf16"): 989e12, ("A100", "bf16"): 312e12,
    ("H200", "fp32"): 67e12, ("H100", "fp32"): 67e12, ("A100", "fp32"): 19.5e12,
}


def peak_flops(device_name: str, precision: str) -> float | None:
    """Datasheet dense peak for a known accelerator, else None (MFU is then not logged)."""
    for (frag, prec), v in _PEAK.items():
        if frag in device_name and prec == precision:
            return v
    return None
