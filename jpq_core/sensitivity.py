"""Layer sensitivity: prune one layer at a time, measure, and allocate per-layer sparsities from it.

`sensitivity_scan` prunes each layer alone (the others dense) to each sparsity of a grid, by the chosen
criterion's scores within that layer, and evaluates the network without fine-tuning, as Han et al. (2015)
and Distiller's sensitivity analysis do. `allocate` then gives every layer the largest sparsity whose
measured loss stays under one tolerance, searching the tolerance (bisection) so that the total sparsity
meets the target; between grid points the loss is interpolated linearly.

`recovery_aware_allocation` (allocation "recovery-aware", issue 17) scans differently: each layer pruned
alone and repaired by least squares, scored by the error at the network's output on calibration samples
(`repaired_scan`), then allocated to minimise the summed error (`allocate_by_output_error`). Stereo, magnitude,
w4/a8, lsq recovery, no fine-tuning: bad-3 17.8 / 32.2 / 69.8% at 80 / 90 / 95% against the global
threshold's 19.1 / 41.0 / 84.0% (docs/recovery.md).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from jpq_core.checkpoints import atomic_write
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


# --------------------------------------------------------------------------------------------------------
# Recovery-aware allocation: each layer's error measured at the network's output, after the repair


REPAIRED_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
# Calibration samples a scan runs the network on at every grid point (stereo crops of 192 x 384, both views;
# classifier training images): the scan's cost is about 10 forward passes per layer over these.
SCAN_SAMPLES = {"stereo": 8, "classification": 128}


def repaired_scan(net, dense, task, scores: dict, sparsities=REPAIRED_SPARSITIES, samples: int | None = None,
                  protect=frozenset(), progress=None) -> dict:
    """{"sparsities", "layers": {layer: [output error at each sparsity]}, "samples"}.

    Each layer alone is pruned to each sparsity (by `scores` within the layer) and refit by least squares on
    its calibration inputs (`jpq_core.recovery.LeastSquares`, AdaPrune), the other layers as they are in `net`
    (all weights kept, quantized as configured); the error is the mean |output − dense output| of the whole
    network on the recovery's calibration samples. This is OBC's per-layer error database (Frantar & Alistarh,
    NeurIPS 2022), scored end to end as SPDY (Frantar & Alistarh, ICML 2022) scores it: a layer whose own
    reconstruction error is small can still break everything after it (the stereo feature extractor's last
    conv), which a layer's own error does not show and the output does. `net` is left as it was.

    One calibration pass collects every layer's normal equations; each grid point then costs one solve and
    one forward pass over the samples (stereo, 19 layers x 10 points: about 5 minutes on one core)."""
    from jpq_core import recovery

    inputs = recovery.calibration_inputs(task, samples or SCAN_SAMPLES.get(getattr(task, "name", None), 0))
    problems = recovery.layer_problems(net, dense, task, len(inputs[0]))
    batch_norms = recovery.following_batch_norms(net, dense, task)
    with torch.no_grad():
        reference = dense.eval()(*inputs)

    def output_error() -> float:
        with torch.no_grad():
            return float((net(*inputs) - reference).abs().mean())

    layers = {k: v for k, v in prunable_layers(net).items() if k not in protect}
    base = output_error()
    result, total, done = {}, len(layers) * len(sparsities), 0
    for name, layer in layers.items():
        problem, errors = problems[name], []
        for s in sparsities:
            if s > 0:
                mask = make_masks({name: scores[name]}, {name: layer.weight.shape}, s, allocation="uniform")[name]
                problem.mask = mask.reshape(len(mask), -1)
                with _restored(layer, batch_norms.get(name)):
                    recovery.install(layer, *recovery.LeastSquares().fit(problem), batch_norms.get(name))
                    errors.append(output_error())
            else:
                errors.append(base)
            done += 1
            if progress:
                progress(done, total)
        result[name] = errors
    return {"sparsities": list(sparsities), "layers": result, "samples": len(inputs[0]),
            "error": "mean |output - dense output| on the calibration samples"}


@contextlib.contextmanager
def _restored(layer, batch_norm):
    """Puts back the layer's weights, mask and bias, and its batch norm's mean, after a trial refit."""
    weights = layer.parametrizations.weight
    saved = [t.detach().clone() for t in (weights.original, weights[0].mask)]
    bias = None if layer.bias is None else layer.bias.detach().clone()
    mean = None if batch_norm is None else batch_norm.running_mean.clone()
    try:
        yield
    finally:
        weights.original.data.copy_(saved[0])
        weights[0].mask.copy_(saved[1])
        if bias is not None:
            layer.bias.data.copy_(bias)
        if mean is not None:
            batch_norm.running_mean.copy_(mean)


def allocate_by_output_error(scan: dict, sizes: dict[str, int], target: float, protect=frozenset()) -> dict[str, float]:
    """Per-layer sparsities meeting `target` overall with the least summed output error (errors taken as
    additive across layers, as OBC's and SPDY's allocations take them). Lagrangian form: at a price λ per
    pruned weight, each layer picks the grid sparsity s minimising error(s) − λ·s·size; λ is bisected until the
    total reaches the target, and the result is scaled onto the target exactly. Unlike `allocate`'s one
    tolerance for every layer, a large layer's weights count for more than a small one's."""
    target = check_sparsity(target)
    grid = np.array(scan["sparsities"], float)
    free = [k for k in sizes if k not in protect]
    missing = [k for k in free if k not in scan["layers"]]
    if missing:
        raise JPQError(f"the scan has no errors for {', '.join(missing[:5])}; scan again with the same protected layers.")
    total = sum(sizes.values())
    if target * total > grid[-1] * sum(sizes[k] for k in free) + 1e-9:
        raise JPQError(f"sparsity {target} is beyond what the scan covers (at most {grid[-1]} per layer); lower it.")
    errors = {k: np.array(scan["layers"][k], float) for k in free}

    def choose(price: float) -> dict[str, float]:
        return {k: float(grid[int(np.argmin(errors[k] - price * grid * sizes[k]))]) for k in free}

    def overall(alloc) -> float:
        return sum(alloc[k] * sizes[k] for k in free) / total

    lo, hi = 0.0, 1e-6
    while overall(choose(hi)) < target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if overall(choose(mid)) < target else (lo, mid)
    alloc = choose(hi)
    scale = target * total / max(1e-12, sum(alloc[k] * sizes[k] for k in free))
    return {k: min(float(grid[-1]), v * scale) for k, v in alloc.items()}


REPAIRED_SCAN_DIR = Path(__file__).resolve().parents[1] / "runs" / "sensitivity_cache"
# Scans shipped with the project (copied from REPAIRED_SCAN_DIR), so the live view offers the allocation at once
# for the configurations they cover; read before the local cache.
SHIPPED_SCAN_DIR = Path(__file__).resolve().parents[1] / "cached_runs" / "scans"


def repaired_scan_name(dense, task, config) -> str:
    """The file name of a configuration's scan: a hash of what the scan depends on, the dense weights, data,
    criterion, bit widths and quantizer settings, protected layers, samples and grid. Not the activation
    calibration (percentile on the page, min/max on the CLI) nor the sparsity: one scan serves both, at every
    sparsity."""
    from jpq_core.score_cache import weights_fingerprint

    settings = [getattr(config, f, None) for f in ("criterion", "wbits", "abits", "layer_wbits", "layer_abits", "symmetric",
                                                    "per_channel", "protect_first_last")]
    spec = (f"{weights_fingerprint(dense)}|{task.data_key}|{settings}|{SCAN_SAMPLES.get(getattr(task, 'name', None), 0)}|"
            f"{REPAIRED_SPARSITIES}")
    return f"repaired-{hashlib.sha1(spec.encode()).hexdigest()[:16]}.json"


def recovery_aware_allocation(dense, task, config, sparsity: float, stats=None, cache_dir: Path | None = None,
                              progress=None, scan: bool = True) -> dict[str, float]:
    """Per-layer sparsities for `config.allocation == "recovery-aware"`: `repaired_scan` of the dense network
    quantized as `config` says (scores from `config.criterion`), then `allocate_by_output_error`. The scan is
    read from disk when it was made before (shipped in SHIPPED_SCAN_DIR or cached in `cache_dir`, default
    REPAIRED_SCAN_DIR): it takes minutes on stereo, the allocation from it milliseconds at any sparsity.
    `scan=False` (the live view) refuses with the command to run instead of scanning."""
    from dataclasses import replace

    from jpq_core.compressed import effective_weights
    from jpq_core.compression import compress_without_training, gradient_stats
    from jpq_core.layers import first_and_last, layer_weights
    from jpq_core.registry import get_criterion

    criterion = get_criterion(config.criterion)
    if criterion.level != "weight":
        raise JPQError(f"the recovery-aware allocation spreads weights over layers; {config.criterion} removes whole "
                       "channels. Choose a weight criterion, or the global or uniform allocation.")
    name = repaired_scan_name(dense, task, config)
    folders = [Path(cache_dir)] if cache_dir else [SHIPPED_SCAN_DIR, REPAIRED_SCAN_DIR]
    found = None
    for folder in folders:
        try:
            found = json.loads((folder / name).read_text())
            break
        except (OSError, ValueError):  # missing or damaged: scanned again, never trusted
            pass
    protect = first_and_last(dense) if config.protect_first_last else set()
    if found is None:
        if not scan:
            bits = f"--wbits {config.wbits or 'float'} --abits {config.abits or 'float'}"
            raise JPQError(f"the recovery-aware allocation needs a scan of every layer of this network for criterion "
                           f"{config.criterion} at these bit widths (about 5 minutes on one core for stereo), and none is "
                           f"saved yet. Run it once: python -m jpq_core compress --network {config.network} --criterion "
                           f"{config.criterion} --sparsity 0.9 {bits} --finetune none --allocation recovery-aware "
                           "--recovery lsq; then choose it again. Until then use the global or uniform allocation.")
        base = compress_without_training(dense, task, replace(config, sparsity=0.0, criterion="magnitude",
                                                              allocation="global"), recovery=False)
        scoring = attach(copy.deepcopy(dense).eval(), None, None)
        if criterion.needs_gradients and stats is None:
            stats = gradient_stats(scoring, task, config, criterion)
        scores = criterion.scores(effective_weights(scoring), stats)
        found = repaired_scan(base, dense, task, scores, REPAIRED_SPARSITIES, SCAN_SAMPLES.get(task.name), protect, progress)
        found["made_for"] = {"network": getattr(config, "network", None), "criterion": config.criterion,
                             "wbits": config.wbits, "abits": config.abits}  # for a reader of the folder; not the key
        try:
            atomic_write(folders[-1] / name, lambda tmp: Path(tmp).write_text(json.dumps(found)))
        except JPQError:  # a cache only saves time: a full disk or read-only folder must not stop the work
            pass
    sizes = {k: w.numel() for k, w in layer_weights(dense).items()}
    return allocate_by_output_error(found, sizes, sparsity, protect)
