"""Classical stereo matchers from OpenCV, scored with the same metric code as the networks.

StereoSGBM (Hirschmueller 2008) with the settings the reference notes quote for the Middlebury pair:
numDisparities=64, blockSize=5, P1=8*3*25, P2=32*3*25, 3-way mode; StereoBM with blockSize 15. OpenCV
returns disparity * 16 as int16 and marks pixels it cannot match with negative values: those count as
missing (bad) in bad-t.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from jpq_core.data.stereo_types import StereoSample
from jpq_core.metrics import stereo_metrics


def _to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def sgbm_disparity(sample: StereoSample, num_disparities: int = 64, block_size: int = 5) -> np.ndarray:
    """StereoSGBM disparity in pixels; NaN where OpenCV found no match."""
    matcher = cv2.StereoSGBM_create(
        minDisparity=0, numDisparities=num_disparities, blockSize=block_size,
        P1=8 * 3 * block_size**2, P2=32 * 3 * block_size**2, mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY,
    )
    raw = matcher.compute(_to_u8(sample.left)[:, :, ::-1], _to_u8(sample.right)[:, :, ::-1])
    return _from_fixed_point(raw)


def bm_disparity(sample: StereoSample, num_disparities: int = 64, block_size: int = 15) -> np.ndarray:
    """StereoBM (block matching on grey images) disparity in pixels; NaN where unmatched."""
    matcher = cv2.StereoBM_create(numDisparities=num_disparities, blockSize=block_size)
    grey = [cv2.cvtColor(_to_u8(img), cv2.COLOR_RGB2GRAY) for img in (sample.left, sample.right)]
    return _from_fixed_point(matcher.compute(*grey))


def _from_fixed_point(raw: np.ndarray) -> np.ndarray:
    disp = raw.astype(np.float32) / 16.0
    disp[raw < 0] = np.nan
    return disp


BASELINES = {"sgbm": sgbm_disparity, "bm": bm_disparity}


def run_baselines(samples: list[StereoSample]) -> dict:
    """{name: metrics + seconds} for every baseline, pixel-weighted over the samples."""
    out = {}
    for name, fn in BASELINES.items():
        start = time.perf_counter()
        results = [stereo_metrics(fn(s), s.disparity) for s in samples]
        seconds = time.perf_counter() - start
        weights = np.array([r["valid_pixels"] for r in results], float)
        out[name] = {k: float(np.average([r[k] for r in results], weights=weights)) for k in results[0] if k != "valid_pixels"}
        out[name]["seconds"] = round(seconds, 3)
    return out
