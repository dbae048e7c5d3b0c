"""Maps as images: disparity and error maps colour-mapped in numpy and encoded as PNG (PIL).

Why not plotly heatmaps: a 741 x 500 heatmap travels as 370,000 floats of JSON (2 MB) on every page update
and the browser rebuilds it, seconds per map on a small machine; a PNG of the same map is ~100 KB, encoded
in milliseconds, and the browser caches an unchanged one. The colours are plotly's own scales (the same as
`jpq_core.plots`), sampled into a 256-entry table. Pure functions of arrays: no Streamlit here.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from jpq_core.plots import DISPARITY_SCALE, ERROR_LIMIT_PX, ERROR_SCALE, disparity_limit, error_map  # noqa: F401 (shared)

UNKNOWN_RGB = (255, 255, 255)  # pixels without a value (no ground truth) are left blank


@lru_cache(maxsize=8)
def colour_table(scale: str) -> np.ndarray:
    """256 x 3 uint8 colours of a named plotly scale, from its low to its high end."""
    from plotly.colors import sample_colorscale

    colours = sample_colorscale(scale, list(np.linspace(0.0, 1.0, 256)), colortype="tuple")
    return np.round(np.array(colours) * 255).astype(np.uint8)


def colourize(values: np.ndarray, vmax: float, scale: str, vmin: float = 0.0) -> np.ndarray:
    """H x W x 3 uint8: `values` clipped to [vmin, vmax] and looked up in `scale`; NaN/inf -> UNKNOWN_RGB."""
    values = np.asarray(values, dtype=np.float32)
    known = np.isfinite(values)
    span = max(float(vmax) - float(vmin), 1e-12)
    index = np.clip((np.where(known, values, vmin) - vmin) * (255.0 / span), 0, 255).astype(np.uint8)
    rgb = colour_table(scale)[index]
    rgb[~known] = UNKNOWN_RGB
    return rgb


def png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an H x W x 3 uint8 image (fast compression: encoding time matters more than bytes here)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def rgb_png(img: np.ndarray) -> bytes:
    """PNG of an RGB image with values in [0, 1]."""
    return png((np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8))


def disparity_png(disparity: np.ndarray, vmax: float) -> bytes:
    return png(colourize(disparity, vmax, DISPARITY_SCALE))


def error_png(error: np.ndarray, vmax: float = ERROR_LIMIT_PX) -> bytes:
    return png(colourize(error, vmax, ERROR_SCALE))


def colour_bar_png(scale: str, width: int = 256, height: int = 10) -> bytes:
    """A horizontal colour bar, low end on the left."""
    return png(np.repeat(colour_table(scale)[None], height, axis=0)[:, np.linspace(0, 255, width).astype(int)])
