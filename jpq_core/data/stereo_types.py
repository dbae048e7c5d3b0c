"""The stereo pair every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StereoSample:
    """A rectified stereo pair.

    left, right: H x W x 3 float32 RGB in [0, 1].
    disparity: H x W float32 left-view disparity in pixels, `inf` where unknown; None without ground truth.
    """

    left: np.ndarray
    right: np.ndarray
    disparity: np.ndarray | None
    name: str
    notices: tuple[str, ...] = ()  # what loading changed (downscaled, converted to grey), for the user to see

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[:2]
