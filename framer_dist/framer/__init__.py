"""The FRAMER objective (docs/specs/framer.md): frequency-aligned self-distillation, vectorised over
layers.

Public API (docs/interfaces.md): :func:`framer_objective`, :func:`select_layers`,
:class:`FramerResult`. :mod:`framer_dist.framer.reference` is a slow per-layer reference for tests
and benchmarks only.
"""

from framer_dist.framer.layers import draw_negative_layers, select_layers
from framer_dist.framer.objective import FramerResult, framer_objective

__all__ = ["framer_objective", "select_layers", "FramerResult", "draw_negative_layers"]
