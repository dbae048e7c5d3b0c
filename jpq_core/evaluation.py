"""Running a network on data and scoring it with `jpq_core.metrics`."""

from __future__ import annotations

import numpy as np
import torch

from jpq_core.data.stereo_types import StereoSample
from jpq_core.metrics import confusion_matrix, stereo_metrics, top1


def _as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


@torch.inference_mode()
def predict_disparity(model: torch.nn.Module, sample: StereoSample) -> np.ndarray:
    """Full-resolution left-view disparity (H x W float32) for one pair."""
    model.eval()
    return model(_as_tensor(sample.left), _as_tensor(sample.right))[0].numpy()


def evaluate_stereo(model: torch.nn.Module, samples: list[StereoSample]) -> dict:
    """Stereo metrics averaged over samples (each weighted by its valid pixels)."""
    results = [stereo_metrics(predict_disparity(model, s), s.disparity) for s in samples]
    weights = np.array([r["valid_pixels"] for r in results], float)
    keys = [k for k in results[0] if k != "valid_pixels"]
    out = {k: float(np.average([r[k] for r in results], weights=weights)) for k in keys}
    out["valid_pixels"] = int(weights.sum())
    return out


@torch.inference_mode()
def classifier_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).numpy()


def evaluate_classifier(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """{'top1', 'samples'} of a classifier on a tensor dataset."""
    return {"top1": top1(classifier_logits(model, images), labels.numpy()), "samples": int(len(labels))}


def classifier_summary(logits: np.ndarray, labels: np.ndarray) -> dict:
    """What the Classifier page shows: top-1, predicted classes, the confusion matrix over every class the
    network outputs, and the indices of the mistakes."""
    predicted = logits.argmax(1)
    classes = logits.shape[1]
    return {"top1": top1(logits, labels), "predicted": predicted, "classes": classes,
            "confusion": confusion_matrix(predicted, labels, classes), "mistakes": np.flatnonzero(predicted != labels)}


def stereo_comparison(model: torch.nn.Module, sample: StereoSample) -> dict:
    """The network and OpenCV's SGBM on one pair: {name: {"disparity", "metrics", "seconds"}}.

    Metrics are None when the pair has no ground truth. Seconds are wall time of this one run.
    """
    import time

    from jpq_core.baselines import sgbm_disparity

    out = {}
    for name, fn in (("network", lambda s: predict_disparity(model, s)), ("sgbm", sgbm_disparity)):
        start = time.perf_counter()
        disp = fn(sample)
        seconds = time.perf_counter() - start
        metrics = stereo_metrics(disp, sample.disparity) if sample.disparity is not None else None
        out[name] = {"disparity": disp, "metrics": metrics, "seconds": seconds}
    return out
