"""Which blocks teach and learn, and the random-layer negative draw (docs/specs/framer.md sections
1, 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from framer_dist.config import FramerConfig


def select_layers(num_blocks: int, cfg: FramerConfig) -> tuple[list[int], int]:
    """(student block indices, teacher block index) for a backbone with ``num_blocks`` blocks.

    ``framer.teacher_layer``: -1 (default) is the final block; negative indices count from the end.
    ``framer.students``:
      - ``"all_but_last"`` (default): every block except the last one and except the teacher block
        (with the default teacher these coincide: blocks ``0 .. num_blocks-2``). The last block's
        readout *is* the final output, so as a student it would only add a degenerate term.
      - ``"all"``: every block (the authors' code), including the teacher's own block.
      - a list of block indices (negative ones count from the end), no duplicates.
    """
    if num_blocks < 1:
        raise ValueError(f"select_layers: num_blocks must be >= 1, got {num_blocks}")
    t = cfg.teacher_layer + num_blocks if cfg.teacher_layer < 0 else cfg.teacher_layer
    if not 0 <= t < num_blocks:
        raise ValueError(f"config key 'framer.teacher_layer': {cfg.teacher_layer} is out of range for a "
                         f"model with {num_blocks} blocks (allowed: -{num_blocks} .. {num_blocks - 1})")
    s = cfg.students
    if s == "all":
        students = list(range(num_blocks))
    elif s == "all_but_last":
        students = [i for i in range(num_blocks - 1) if i != t]
    elif isinstance(s, list):
        students = []
        for i in s:
            j = i + num_blocks if i < 0 else i
            if not 0 <= j < num_blocks:
                raise ValueError(f"config key 'framer.students': block index {i} is out of range for a "
                                 f"model with {num_blocks} blocks")
            if j in students:
                raise ValueError(f"config key 'framer.students': block {j} is listed twice")
            students.append(j)
    else:
        raise ValueError(f"config key 'framer.students': {s!r} is not allowed; allowed values: "
                         "'all', 'all_but_last' or a list of block indices")
    if not students:
        raise ValueError(f"config key 'framer.students': selects no block of a {num_blocks}-block model")
    return students, t


def draw_negative_layers(num_students: int, generator: torch.Generator) -> Tensor:
    """For each student position ``i`` one position ``j != i``, uniform over the other students.

    One draw per layer per step, shared by the whole batch (and by every data-parallel rank when
    their generators are in the same state). Consumes ``num_students`` integers from ``generator``,
    so a resumed run with the restored generator state draws the same layers. Returns a CPU
    ``int64`` tensor ``[num_students]``.
    """
    if num_students < 2:
        raise ValueError(f"framer.random_negatives needs at least two student layers, got {num_students}")
    r = torch.randint(0, num_students - 1, (num_students,), generator=generator)
    i = torch.arange(num_students)
    return r + (r >= i).long()  # skip i itself: uniform over the other L-1 positions
