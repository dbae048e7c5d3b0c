"""Comparing importance criteria: score distributions, overlap of kept weights, rank agreement, sensitivity.

All comparisons start from the gradient statistics the compression pipeline itself uses (same calibration
batches, same on-disk cache entry, see `calibration_stats`), so what the Taylor-scores page shows is what
`compress` prunes by.

- Overlap of the weights two criteria keep at sparsity s, per layer: IoU = |K_a & K_b| / |K_a | K_b|
  (Jaccard index). Two independent random criteria keeping a share k of a layer have E[IoU] = k / (2 - k),
  which falls as the sparsity rises; a criterion with itself has IoU 1.
- Rank agreement per layer: Spearman's rho, the Pearson correlation of the ranks (ties get average ranks);
  1 = same order, -1 = reversed, ~0 = unrelated.
- Layer sensitivity: each layer pruned alone, the rest dense (`jpq_core.sensitivity.sensitivity_scan`),
  cached on disk as JSON because a scan is one evaluation per (layer, sparsity).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from jpq_core.checkpoints import atomic_write
from jpq_core.compressed import attach
from jpq_core.criteria import GradientStats
from jpq_core.errors import JPQError
from jpq_core.layers import first_and_last, layer_weights, prunable_layers
from jpq_core.pipeline import CompressionConfig
from jpq_core.pruning import make_masks
from jpq_core.registry import get_criterion
from jpq_core.score_cache import cached_gradient_stats, weights_fingerprint
from jpq_core.sensitivity import SCAN_SPARSITIES, sensitivity_scan

SENSITIVITY_DIR = Path(__file__).resolve().parents[1] / "runs" / "sensitivity_cache"
QUICK_SCAN_SPARSITIES = (0.0, 0.5, 0.9, 0.99)

Scores = dict[str, torch.Tensor]


def _masked_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy carrying all-ones mask parametrizations, as the pipeline's working network does (so the
    weights fingerprint, hence the score-cache entry, is the pipeline's)."""
    return attach(copy.deepcopy(model).eval(), None, None)


def calibration_stats(model, task, progress=None, cache_dir: Path | None = None) -> GradientStats:
    """The gradient statistics `compress` would use for `model` with the default configuration."""
    config = CompressionConfig()
    return cached_gradient_stats(_masked_copy(model), task, config.calibration_batches, config.seed + 1,
                                 cache_dir=cache_dir, progress=progress)


def criterion_scores(model, names, stats: GradientStats | None) -> dict[str, Scores]:
    """{criterion: {layer: score per weight}} for weight-level criteria."""
    weights = {k: v.clone() for k, v in layer_weights(model).items()}
    out = {}
    for name in names:
        criterion = get_criterion(name)
        if criterion.level != "weight":
            raise JPQError(f"{name!r} scores whole channels; compare weight-level criteria here.")
        if criterion.needs_gradients and stats is None:
            raise JPQError(f"{name!r} needs gradient statistics; compute them first (calibration_stats).")
        out[name] = criterion.scores(weights, stats)
    return out


def score_distribution(scores: Scores) -> pd.DataFrame:
    """Per layer: count, share of exact zeros, and quantiles (1, 25, 50, 75, 99 %) of the positive scores.

    Zeros are counted apart because a log axis cannot show them (a weight whose gradient is always zero,
    behind a dead ReLU say, has Taylor score 0)."""
    rows = []
    for layer, s in scores.items():
        v = s.detach().flatten().double().numpy()
        pos = v[v > 0]
        q = np.quantile(pos, [0.01, 0.25, 0.5, 0.75, 0.99]) if pos.size else [np.nan] * 5
        rows.append({"layer": layer, "weights": v.size, "zero_share": 1.0 - pos.size / max(1, v.size),
                     "p1": q[0], "q1": q[1], "median": q[2], "q3": q[3], "p99": q[4]})
    return pd.DataFrame(rows)


def kept_masks(model, scores: Scores, sparsity: float, allocation: str = "global", protect_first_last: bool = True) -> dict:
    """Keep-masks at `sparsity`, exactly as the pipeline makes them (`jpq_core.pruning.make_masks`)."""
    protect = first_and_last(model) if protect_first_last else set()
    return make_masks(scores, {k: v.shape for k, v in scores.items()}, sparsity, allocation, protect)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a | b| of two boolean masks; 1.0 when both are empty (they agree)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho between two score tensors of one layer (NaN when either is constant)."""
    x, y = a.detach().flatten().double().numpy(), b.detach().flatten().double().numpy()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _pairs(names):
    names = list(names)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def _pooled(per_layer: dict, layers) -> torch.Tensor:
    return torch.cat([per_layer[k].flatten() for k in layers])


def mask_overlap(masks: dict[str, dict]) -> pd.DataFrame:
    """One row per (pair of criteria, layer): IoU of the kept weights and the share each keeps; plus an
    "all layers" row per pair over all weights."""
    rows = []
    for a, b in _pairs(masks):
        layers = list(masks[a])
        for layer, ma, mb in [(k, masks[a][k], masks[b][k]) for k in layers] + \
                [("all layers", _pooled(masks[a], layers), _pooled(masks[b], layers))]:
            rows.append({"pair": f"{a} vs {b}", "layer": layer, "iou": iou(ma, mb),
                         "kept_first": float(ma.float().mean()), "kept_second": float(mb.float().mean())})
    return pd.DataFrame(rows)


def rank_agreement(scores: dict[str, Scores]) -> pd.DataFrame:
    """One row per (pair of criteria, layer): Spearman's rho of their scores; plus an "all layers" row per
    pair over the pooled scores (what a global threshold ranks). Independent of the sparsity."""
    rows = []
    for a, b in _pairs(scores):
        layers = list(scores[a])
        for layer, sa, sb in [(k, scores[a][k], scores[b][k]) for k in layers] + \
                [("all layers", _pooled(scores[a], layers), _pooled(scores[b], layers))]:
            rows.append({"pair": f"{a} vs {b}", "layer": layer, "spearman": rank_correlation(sa, sb)})
    return pd.DataFrame(rows)


def compare_criteria(scores: dict[str, Scores], masks: dict[str, dict]) -> pd.DataFrame:
    """`mask_overlap` and `rank_agreement` side by side, one row per (pair, layer)."""
    return mask_overlap(masks).merge(rank_agreement(scores), on=["pair", "layer"], sort=False)


def kernel_grid(mask: torch.Tensor) -> np.ndarray:
    """A layer's mask as a 2-D array: one row per output channel, one column per (input channel, ky, kx)
    in memory order, so each run of k*k columns is one kernel."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return m.reshape(m.shape[0], -1) if m.ndim > 1 else m.reshape(1, -1)


def agreement_grid(mask_a: torch.Tensor, mask_b: torch.Tensor) -> np.ndarray:
    """Per weight: 0 removed by both, 1 kept by a only, 2 kept by b only, 3 kept by both."""
    return kernel_grid(mask_a).astype(np.int8) + 2 * kernel_grid(mask_b).astype(np.int8)


# ---- layer sensitivity --------------------------------------------------------------------------------


QUICK_IMAGES = 256  # classification: the first test images
QUICK_CROP = (256, 384)  # stereo: the central crop of each evaluation pair, full resolution (disparities unchanged)


class QuickEvaluation:
    """A task's evaluation on less data, for a faster sensitivity scan: the first `QUICK_IMAGES` test images
    (classification) or the central `QUICK_CROP` of each evaluation pair at full resolution (stereo, so
    disparities and bad-3 keep their meaning; pixels near the crop's left edge lose their match, for the
    dense and the pruned network alike). Has what `sensitivity_scan` reads: name, primary_metric, evaluate."""

    def __init__(self, task):
        self.name, self.primary_metric, self.task = task.name, task.primary_metric, task
        self.eval_data = f"quick:{getattr(task, 'eval_data', None) or getattr(task, 'data', '')}"
        self._samples = None

    def evaluate(self, model) -> dict:
        from jpq_core.evaluation import evaluate_classifier, evaluate_stereo

        if hasattr(self.task, "test_x"):
            n = QUICK_IMAGES
            return {"top1": evaluate_classifier(model, self.task.test_x[:n], self.task.test_y[:n])["top1"]}
        if self._samples is None:
            from dataclasses import replace

            from jpq_core.data import stereo_eval_samples

            h, w = QUICK_CROP
            self._samples = []
            for s in stereo_eval_samples(self.task.eval_data):
                top, left = max(0, (s.shape[0] - h) // 2), max(0, (s.shape[1] - w) // 2)
                box = (slice(top, top + h), slice(left, left + w))
                self._samples.append(replace(s, left=s.left[box], right=s.right[box], disparity=s.disparity[box],
                                             name=f"{s.name} (central {h}x{w})"))
        return evaluate_stereo(model, self._samples)


def _scan_key(model, task, criterion: str, sparsities) -> str:
    evaluation = getattr(task, "eval_data", None) or getattr(task, "data", "")
    grid = ",".join(f"{s:g}" for s in sparsities)
    spec = f"{weights_fingerprint(model)}|{task.name}|{evaluation}|{criterion}|{grid}"
    return hashlib.sha1(spec.encode()).hexdigest()[:16]


def _scan_path(model, task, criterion: str, sparsities, cache_dir) -> Path:
    return Path(cache_dir or SENSITIVITY_DIR) / f"{_scan_key(model, task, criterion, sparsities)}.json"


def read_sensitivity(model, task, criterion: str, sparsities=SCAN_SPARSITIES, cache_dir: Path | None = None) -> dict | None:
    """A scan saved by `sensitivity_curves` for these weights, task (or its `QuickEvaluation`), criterion and
    grid, else None."""
    path = _scan_path(model, task, criterion, tuple(float(s) for s in sparsities), cache_dir)
    try:
        return dict(json.loads(path.read_text()), cached=True)
    except (OSError, ValueError):  # missing or damaged: recomputed, never trusted
        return None


def sensitivity_curves(model, task, criterion: str, stats: GradientStats | None, sparsities=SCAN_SPARSITIES,
                       cache_dir: Path | None = None, progress=None) -> dict:
    """`sensitivity_scan` of `model` by `criterion` (scores within each layer), read from disk when the same
    weights, task, criterion and grid were scanned before. `task` may be a `QuickEvaluation`. Adds "metric"
    (the task's primary metric), "seconds" (wall time of the scan when it ran) and "cached" (read from disk)."""
    sparsities = tuple(float(s) for s in sparsities)
    scan = read_sensitivity(model, task, criterion, sparsities, cache_dir)
    if scan is not None:
        return scan
    start = time.perf_counter()
    scores = criterion_scores(model, [criterion], stats)[criterion]
    scan = sensitivity_scan(_masked_copy(model), task, scores, sparsities, progress=progress)
    scan.update(metric=task.primary_metric[0], criterion=criterion, seconds=round(time.perf_counter() - start, 1))
    text = json.dumps(scan)
    try:
        atomic_write(_scan_path(model, task, criterion, sparsities, cache_dir), lambda tmp: Path(tmp).write_text(text))
    except JPQError:  # a cache only saves time: a full disk or read-only folder must not stop the work
        pass
    return dict(scan, cached=False)


def sensitivity_frame(scan: dict) -> pd.DataFrame:
    """Long table: layer, sparsity, loss (how much worse than dense in the task's primary metric)."""
    return pd.DataFrame([{"layer": layer, "sparsity": s, "loss": loss}
                         for layer, losses in scan["layers"].items() for s, loss in zip(scan["sparsities"], losses)])


def layer_sizes(model) -> dict[str, int]:
    return {k: m.weight.numel() for k, m in prunable_layers(model).items()}
