"""FAW and FAM, the two adaptive modulation weights (docs/specs/framer.md section 4). Both are
detached."""

from __future__ import annotations

import torch
from torch import Tensor


def faw_weight(e_student: Tensor, e_teacher: Tensor, denominator: str, eps: float) -> Tensor:
    """Frequency-based adaptive weight ``w = 1 / (1 + Delta)``, detached.

    ``Delta = |E_teacher - E_student| / (D + eps)`` with ``D = E_student`` (``"student"``, the
    authors' code), ``E_teacher`` (``"teacher"``), or no division at all (``"none"``: the absolute
    gap, which then depends on the feature scale). ``e_student``: ``[L, B]``; ``e_teacher``: ``[B]``.
    """
    e_student = e_student.detach()
    e_teacher = e_teacher.detach()
    gap = (e_teacher.unsqueeze(0) - e_student).abs()
    if denominator == "student":
        delta = gap / (e_student + eps)
    elif denominator == "teacher":
        delta = gap / (e_teacher.unsqueeze(0) + eps)
    elif denominator == "none":
        delta = gap
    else:
        raise ValueError(f"config key 'framer.faw_denominator': {denominator!r} is not allowed; "
                         "allowed values: 'student', 'teacher', 'none'")
    return 1.0 / (1.0 + delta)


def fam_gate(cos: Tensor) -> Tensor:
    """Frequency-based alignment modulation ``a = relu(cos(student, teacher))``, detached."""
    return torch.relu(cos.detach())
