"""Accuracy metrics: stereo end-point error and bad-t, classification top-1.

Stereo metrics are taken over every pixel with valid (finite) ground truth. A pixel without a prediction
(NaN, inf or negative, as OpenCV marks it) counts as bad for bad-t and is left out of the EPE, whose
`coverage` says how many valid pixels had a prediction.
"""

from __future__ import annotations

import numpy as np


def stereo_metrics(pred: np.ndarray, gt: np.ndarray, thresholds=(1.0, 2.0, 3.0)) -> dict:
    """{'epe', 'bad1', 'bad2', 'bad3', 'coverage', 'valid_pixels'} for a disparity map against ground truth."""
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    valid = np.isfinite(gt)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError("ground truth has no valid pixel")
    predicted = valid & np.isfinite(pred) & (pred >= 0)
    err = np.abs(pred[predicted] - gt[predicted])
    out = {
        "epe": float(err.mean()) if err.size else float("nan"),
        "coverage": float(predicted.sum() / n_valid),
        "valid_pixels": n_valid,
    }
    for t in thresholds:
        good = int((err <= t).sum())
        out[f"bad{t:g}"] = float(1.0 - good / n_valid)
    return out


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose highest logit is the true label."""
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predicted)), 1)
    return counts
