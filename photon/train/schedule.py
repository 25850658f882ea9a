"""One global learning-rate schedule: linear warmup, then cosine decay to a floor (Photon: 10% of peak).

It is indexed by the *global* (sequential) step, so every client of every round continues the same curve:
a client that starts at global step s with H local steps uses lr(s), …, lr(s+H-1).
"""

import math


def get_lr(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """LR at global step `step` (0-based) for a schedule of `total` steps; constant at the floor afterwards."""
    floor = peak * min_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return floor
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
