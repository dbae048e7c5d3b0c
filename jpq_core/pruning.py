"""From scores to masks, and applying masks.

`make_masks` turns importance scores into keep-masks at an exact sparsity:
- allocation "global": one threshold over all layers (scores must be comparable across layers);
- allocation "uniform": every unprotected layer pruned to the same sparsity;
- allocation {layer: sparsity}: per-layer sparsities, e.g. from a sensitivity scan.
Sparsity is counted over all prunable weights (protected layers included), exactly: ties are broken by
position, so the count of removed weights is always round(sparsity * total). Protected layers (the first
and last, typically) stay dense; every other layer keeps at least `min_keep` weights unless min_keep=0.

Channel-level masks, which must remove coupled channels together, come from `jpq_core.channels`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from jpq_core.errors import JPQError
from jpq_core.layers import prunable_layers


def check_sparsity(sparsity: float) -> float:
    """`sparsity` as a float in [0, 1); anything else (NaN, text, 1.0) is a JPQError."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(sparsity, bool) or not 0.0 <= value < 1.0:  # NaN fails every comparison
        raise JPQError(f"sparsity must be in [0, 1), got {sparsity!r}; 0.95 removes 95% of the weights.")
    return value


def _lowest(flat: torch.Tensor, count: int, highest: bool = False) -> torch.Tensor:
    """Boolean over `flat`: its `count` lowest (or `highest`) values, ties broken by position, i.e. the first
    `count` entries of a stable argsort, found in linear time (a selection, not a sort): sorting a ResNet-18's
    11M scores took seconds of every slider move."""
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if count <= 0:
        return chosen
    if count >= flat.numel() or bool(torch.isnan(flat).any()):  # NaN has no place in a selection: sort
        chosen[torch.argsort(flat, descending=highest, stable=True)[:count]] = True
        return chosen
    keyed = -flat if highest else flat
    value = keyed.kthvalue(count).values  # the count-th lowest: everything below it goes, then ties by position
    below = keyed < value
    chosen |= below
    chosen[torch.nonzero(keyed == value).flatten()[: count - int(below.sum())]] = True
    return chosen


def _prune_lowest(scores: list[torch.Tensor], count: int, reserved: list[torch.Tensor]) -> list[torch.Tensor]:
    """Keep-masks that remove the `count` lowest scores among positions not `reserved`, ties by position."""
    flat = torch.cat([s.flatten().double() for s in scores])
    blocked = torch.cat([r.flatten() for r in reserved])
    flat = torch.where(blocked, torch.full_like(flat, float("inf")), flat)
    keep = ~_lowest(flat, count)
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].view(s.shape))
        start += s.numel()
    return out


def _reserve_top(score: torch.Tensor, min_keep: int) -> torch.Tensor:
    """The `min_keep` highest scores, ties by position (a descending stable sort's first entries)."""
    return _lowest(score.flatten().double(), min_keep, highest=True).view(score.shape)


def make_masks(
    scores: dict[str, torch.Tensor],
    shapes: dict[str, torch.Size],
    sparsity: float,
    allocation="global",
    protect: set[str] = frozenset(),
    min_keep: int = 1,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = kept), one per layer, with the weight's shape."""
    sparsity = check_sparsity(sparsity)
    unknown = set(protect) - set(shapes)
    if unknown:
        raise JPQError(f"cannot protect unknown layers: {', '.join(sorted(unknown))}.")
    for k in shapes:
        if scores[k].shape != shapes[k]:
            raise JPQError(f"layer {k}: scores of shape {tuple(scores[k].shape)} for a weight of shape {tuple(shapes[k])}; "
                           "channel-level criteria go through jpq_core.channels.")
    free = [k for k in shapes if k not in protect]
    total_weights = sum(torch.Size(s).numel() for s in shapes.values())
    masks = {k: torch.ones(shapes[k], dtype=torch.bool) for k in protect}

    if allocation == "global":
        target = round(sparsity * total_weights)
        prunable = sum(torch.Size(shapes[k]).numel() for k in free)
        reserved = [_reserve_top(scores[k], min(min_keep, scores[k].numel())) for k in free]
        available = prunable - int(sum(r.sum() for r in reserved))
        if target > available:
            raise JPQError(
                f"sparsity {sparsity:.4g} needs {target} weights removed but only {available} can be "
                f"(protected layers and min_keep={min_keep} per layer keep the rest); lower the sparsity or protect fewer layers."
            )
        for k, m in zip(free, _prune_lowest([scores[k] for k in free], target, reserved)):
            masks[k] = m
        return {k: masks[k] for k in shapes}

    if not (allocation == "uniform" or isinstance(allocation, dict)):
        raise JPQError(f"allocation must be 'global', 'uniform' or a dict of per-layer sparsities, not {allocation!r}.")
    per_layer = {k: sparsity for k in free} if allocation == "uniform" else allocation
    for k in free:
        s = check_sparsity(per_layer.get(k, 0.0))
        n = scores[k].numel()
        count = min(round(s * n), n - min(min_keep, n))
        masks[k] = _prune_lowest([scores[k]], count, [_reserve_top(scores[k], min(min_keep, n))])[0]
    return {k: masks[k] for k in shapes}


def sparsity_of(masks: dict[str, torch.Tensor]) -> float:
    """Share of removed weights over all masked layers."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(1, total)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights in place."""
    layers = prunable_layers(model)
    with torch.no_grad():
        for name, mask in masks.items():
            layers[name].weight.mul_(mask.to(layers[name].weight.dtype))
    return model


def agp_sparsity(step: int, total_steps: int, final: float, initial: float = 0.0, start: int = 0) -> float:
    """Automated gradual pruning (Zhu & Gupta 2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0)/n)^3."""
    if step <= start:
        return initial
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    return final + (initial - final) * (1.0 - progress) ** 3
