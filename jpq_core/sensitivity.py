"""Layer sensitivity: prune one layer at a time, measure, and allocate per-layer sparsities from it.

`sensitivity_scan` prunes each layer alone (the others dense) to each sparsity of a grid, by the chosen
criterion's scores within that layer, and evaluates the network without fine-tuning, as Han et al. (2015)
and Distiller's sensitivity analysis do. `allocate` then gives every layer the largest sparsity whose
measured loss stays under one tolerance, searching the tolerance (bisection) so that the total sparsity
meets the target; between grid points the loss is interpolated linearly.
"""

from __future__ import annotations

import numpy as np
import torch

from jpq_core.compressed import attach
from jpq_core.errors import JPQError
from jpq_core.layers import prunable_layers
from jpq_core.pruning import check_sparsity, make_masks

SCAN_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def metric_loss(metrics: dict, dense: dict, task) -> float:
    """How much worse than dense, in the task's primary metric (>= 0 means worse)."""
    name, higher_is_better = task.primary_metric
    delta = metrics[name] - dense[name]
    return -delta if higher_is_better else delta


def sensitivity_scan(net, task, scores: dict, sparsities=None, set_masks=None, progress=None) -> dict:
    """{layer: [loss at each sparsity]} plus "sparsities" and "dense" metrics.

    `net` must carry mask parametrizations (see `jpq_core.compressed.attach`); `set_masks(masks)` installs
    masks on it (defaults to `attach`'s). Masks are left all-ones at the end.
    """
    set_masks = set_masks or (lambda masks: attach(net, masks, None))
    sparsities = SCAN_SPARSITIES if sparsities is None else sparsities
    layers = prunable_layers(net)
    shapes = {k: l.weight.shape for k, l in layers.items()}
    ones = {k: torch.ones(s, dtype=torch.bool) for k, s in shapes.items()}
    set_masks(ones)
    dense = task.evaluate(net)
    result, total, done = {}, len(layers) * len(sparsities), 0
    for name in layers:
        losses = []
        for s in sparsities:
            layer_mask = make_masks({name: scores[name]}, {name: shapes[name]}, s, allocation="uniform")[name]
            set_masks({**ones, name: layer_mask})
            losses.append(max(0.0, metric_loss(task.evaluate(net), dense, task)) if s > 0 else 0.0)
            done += 1
            if progress:
                progress(done, total)
        result[name] = losses
    set_masks(ones)
    return {"sparsities": list(sparsities), "dense": dense, "layers": result}


def allocate(scan: dict, sizes: dict[str, int], target: float, protect=frozenset()) -> dict[str, float]:
    """Per-layer sparsities meeting `target` overall, each layer as sparse as one shared tolerance allows."""
    target = check_sparsity(target)
    grid = np.array(scan["sparsities"], float)
    free = [k for k in sizes if k not in protect]
    total = sum(sizes.values())
    top = grid[-1]
    if target * total > top * sum(sizes[k] for k in free) + 1e-9:
        raise JPQError(f"sparsity {target} is beyond what the scan covers (at most {top} per layer); scan further or lower it.")
    # Loss curves made non-decreasing, so that "largest sparsity under tolerance" is well defined.
    curves = {k: np.maximum.accumulate(np.array(scan["layers"][k], float)) for k in free}

    def per_layer(tol: float) -> dict[str, float]:
        out = {}
        for k in free:
            c = curves[k]
            if c[-1] <= tol:
                out[k] = float(top)
                continue
            j = int(np.argmax(c > tol))  # first grid point over the tolerance; j >= 1 since c[0] = 0
            lo, hi = c[j - 1], c[j]
            frac = 0.0 if hi <= lo else (tol - lo) / (hi - lo)
            out[k] = float(grid[j - 1] + frac * (grid[j] - grid[j - 1]))
        return out

    def overall(alloc):
        return sum(alloc[k] * sizes[k] for k in free) / total

    lo, hi = 0.0, max(float(c[-1]) for c in curves.values()) + 1e-9
    for _ in range(60):
        mid = (lo + hi) / 2
        if overall(per_layer(mid)) < target:
            lo = mid
        else:
            hi = mid
    alloc = per_layer(hi)
    # Spread the rounding remainder over the free layers proportionally, so the total lands on the target.
    scale = target * total / max(1e-12, sum(alloc[k] * sizes[k] for k in free))
    return {k: min(float(top), alloc[k] * scale) for k in free}
