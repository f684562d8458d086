"""long2short by model merging (k1.5 sec. 2.4): average two checkpoints' weights, no training.

    theta = weight * theta_long + (1 - weight) * theta_short      (k1.5: weight = 0.5)
Floating tensors are averaged in float32 and cast back to the long model's dtype; non-float tensors
(step counters, index buffers, bool masks) are copied from the first (long) state dict.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def merge_state_dicts(
    long: Mapping[str, Tensor], short: Mapping[str, Tensor], weight: float = 0.5
) -> dict[str, Tensor]:
    """Weighted average of two state dicts with identical keys and shapes.

    Raises ValueError naming the first key (in `long`'s order, then `short`'s) that is missing from
    the other dict, or the first key whose shapes differ.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"merge weight {weight} must lie in [0, 1]")
    for key in long:
        if key not in short:
            raise ValueError(f"cannot merge: key {key!r} is in the long model but not the short one")
    for key in short:
        if key not in long:
            raise ValueError(f"cannot merge: key {key!r} is in the short model but not the long one")
    out = {}
    for key, a in long.items():
        b = short[key]
        if a.shape != b.shape:
            raise ValueError(f"cannot merge: {key!r} has shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.is_floating_point():
            mixed = weight * a.detach().float() + (1.0 - weight) * b.detach().to(a.device).float()
            out[key] = mixed.to(a.dtype)
        else:
            out[key] = a.detach().clone()
    return out
