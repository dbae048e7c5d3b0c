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
LEVELS = 255  # colours per scale: palette entries 0..254; entry 255 is UNKNOWN_RGB


@lru_cache(maxsize=8)
def colour_table(scale: str) -> np.ndarray:
    """LEVELS x 3 uint8 colours of a named plotly scale, from its low to its high end."""
    from plotly.colors import sample_colorscale

    colours = sample_colorscale(scale, list(np.linspace(0.0, 1.0, LEVELS)), colortype="tuple")
    return np.round(np.array(colours) * 255).astype(np.uint8)


@lru_cache(maxsize=8)
def palette(scale: str) -> bytes:
    """The 256-colour PNG palette of a scale: its LEVELS colours, then UNKNOWN_RGB."""
    return np.concatenate([colour_table(scale), np.array([UNKNOWN_RGB], np.uint8)]).tobytes()


def colour_indices(values: np.ndarray, vmax: float, vmin: float = 0.0) -> np.ndarray:
    """H x W uint8 palette indices: `values` clipped to [vmin, vmax] onto 0..LEVELS-1; NaN/inf -> LEVELS."""
    values = np.asarray(values, dtype=np.float32)
    span = max(float(vmax) - float(vmin), 1e-12)
    scaled = (values - np.float32(vmin)) * np.float32((LEVELS - 1) / span) + np.float32(0.5)
    index = np.clip(np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0), 0, LEVELS - 1).astype(np.uint8)
    index[~np.isfinite(values)] = LEVELS
    return index


def colourize(values: np.ndarray, vmax: float, scale: str, vmin: float = 0.0) -> np.ndarray:
    """H x W x 3 uint8: `values` clipped to [vmin, vmax] and looked up in `scale`; NaN/inf -> UNKNOWN_RGB."""
    return np.frombuffer(palette(scale), np.uint8).reshape(-1, 3)[colour_indices(values, vmax, vmin)]


def png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an H x W x 3 uint8 image (fast compression: encoding time matters more than bytes here)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def colour_mapped_png(values: np.ndarray, vmax: float, scale: str) -> bytes:
    """A palette PNG of `values` in `scale` (see `colourize`): one byte per pixel, so it encodes ~5x faster
    than the RGB image and decodes to the same colours."""
    image = Image.fromarray(colour_indices(values, vmax))
    image.putpalette(palette(scale))  # "L" -> "P": the indices keep their bytes
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def rgb_png(img: np.ndarray) -> bytes:
    """PNG of an RGB image with values in [0, 1]."""
    return png((np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8))


def disparity_png(disparity: np.ndarray, vmax: float) -> bytes:
    return colour_mapped_png(disparity, vmax, DISPARITY_SCALE)


def error_png(error: np.ndarray, vmax: float = ERROR_LIMIT_PX) -> bytes:
    return colour_mapped_png(error, vmax, ERROR_SCALE)


def colour_bar_png(scale: str, width: int = 256, height: int = 10) -> bytes:
    """A horizontal colour bar, low end on the left."""
    return png(np.repeat(colour_table(scale)[None], height, axis=0)[:, np.linspace(0, LEVELS - 1, width).astype(int)])
