"""Schedules: warmup + cosine learning rate, cosine weight decay, EMA momentum.

Positions and lengths are in any one unit: optimizer steps, or fractions of a time budget.
"""

from __future__ import annotations

import math


def cosine_schedule(step: float, total_steps: float, start: float, end: float, warmup_steps: float = 0,
                    warmup_start: float = 0.0) -> float:
    """Linear warmup from ``warmup_start`` to ``start``, then cosine from ``start`` to ``end``."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-12)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: float, total_steps: float, start: float, end: float) -> float:
    """Momentum rising linearly from ``start`` to ``end`` over training (I-JEPA)."""
    return start + (end - start) * min(step / max(total_steps, 1e-12), 1.0)
