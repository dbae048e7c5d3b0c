"""Maps as PNG images (jpq_core.images): colours from the plotly scale, unknown pixels blank, valid PNGs."""

import io

import numpy as np
import pytest
from PIL import Image

from jpq_core.images import (UNKNOWN_RGB, colour_table, colourize, disparity_limit, disparity_png, error_map,
                             error_png)


def test_values_map_to_the_ends_of_the_scale_and_unknown_pixels_are_blank():
    values = np.array([[0.0, 50.0, 100.0, 1e9], [np.nan, np.inf, -5.0, 100.0]], np.float32)
    rgb = colourize(values, 100.0, "Viridis")
    table = colour_table("Viridis")
    assert rgb.shape == (2, 4, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == table[0]).all() and (rgb[0, 2] == table[-1]).all()
    assert (rgb[0, 3] == table[-1]).all() and (rgb[1, 2] == table[0]).all()  # clipped, not wrapped
    assert (rgb[1, 0] == UNKNOWN_RGB).all() and (rgb[1, 1] == UNKNOWN_RGB).all()


def test_a_disparity_png_decodes_to_the_colour_mapped_map():
    disparity = np.linspace(0, 80, 741 * 500, dtype=np.float32).reshape(500, 741)
    decoded = np.asarray(Image.open(io.BytesIO(disparity_png(disparity, 88.0))).convert("RGB"))
    assert decoded.shape == (500, 741, 3)
    assert (decoded == colourize(disparity, 88.0, "Viridis")).all()  # lossless


def test_error_map_is_blank_without_ground_truth_and_limits_come_from_known_pixels():
    truth = np.array([[10.0, np.inf], [20.0, 30.0]], np.float32)
    predicted = np.array([[12.0, 5.0], [20.0, 25.0]], np.float32)
    error = error_map(predicted, truth)
    assert error[0, 0] == 2.0 and np.isnan(error[0, 1]) and error[1, 1] == 5.0
    assert disparity_limit(truth) == pytest.approx(33.0)
    assert error_png(error).startswith(b"\x89PNG")
    with pytest.raises(ValueError):
        disparity_limit(np.full((2, 2), np.inf))
