"""Procedural stereo scenes with exact ground-truth disparity.

A scene is a stack of textured planar layers: a background plane covering everything and several shapes
(ellipses, polygons, rotated rectangles) floating in front of it. Each layer has a disparity plane
d(x, y) = a + b*x + c*y in left-image coordinates (b = c = 0 is fronto-parallel). Both views are rendered
exactly by inverting the plane mapping: the right-view pixel x_r sees the left-view point x_l with
x_r = x_l - d(x_l, y), so x_l = (x_r + a + c*y) / (1 - b). Occlusion is a z-buffer on disparity: at every
pixel of either view the layer with the largest disparity (the nearest) wins.

Textures mix multi-scale noise with crops of scikit-image's sample photographs (never the Middlebury
motorcycle pair, which is kept for evaluation). The two views get independent photometric changes (gain,
bias, gamma, noise) as real cameras do. Everything is deterministic in the seed; the training and
validation splits draw seeds from disjoint ranges (`scene_seed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from jpq_core.data.stereo_types import StereoSample

# Seeds for the validation split start here, far above any training index, so the splits never meet.
VALIDATION_SEED_BASE = 1_000_000_000

# Sample images known to ship inside scikit-image (no download). The motorcycle pair is excluded on
# purpose: it is the real evaluation set.
_SKIMAGE_TEXTURES = (
    "astronaut", "camera", "coffee", "chelsea", "coins", "moon", "page", "text", "rocket",
    "hubble_deep_field", "immunohistochemistry", "brick", "grass", "gravel", "clock", "cat",
    "colorwheel", "logo", "horse", "retina", "shepp_logan_phantom", "cell",
)


def scene_seed(split: str, index: int) -> int:
    """The seed of scene `index` in `split` ("train" or "validation"); the two ranges are disjoint."""
    if split == "train":
        if not 0 <= index < VALIDATION_SEED_BASE:
            raise ValueError(f"training scene index must be in [0, {VALIDATION_SEED_BASE})")
        return index
    if split == "validation":
        return VALIDATION_SEED_BASE + index
    raise ValueError(f"split must be 'train' or 'validation', not {split!r}")


@lru_cache(maxsize=1)
def _photo_textures() -> tuple[np.ndarray, ...]:
    """The bundled scikit-image photographs as float32 RGB in [0, 1] (those that load offline)."""
    from skimage import data

    photos = []
    for name in _SKIMAGE_TEXTURES:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - an image that needs a download is simply skipped
            continue
        img = img.astype(np.float32)
        img = img / max(float(img.max()), 1.0)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(img[:, :, :3]))
    return tuple(photos)


def _noise_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multi-scale value noise: octaves from coarse blobs to single-pixel grain, random roughness."""
    roughness = rng.uniform(0.3, 1.1)
    out = np.zeros((h, w, 3), np.float32)
    cell = float(max(h, w)) / rng.uniform(2, 6)
    while cell >= 1.0:
        gh, gw = int(h / cell) + 2, int(w / cell) + 2
        grid = rng.standard_normal((gh, gw, 3)).astype(np.float32)
        interp = cv2.INTER_CUBIC if cell > 2 else cv2.INTER_NEAREST
        out += cv2.resize(grid, (w, h), interpolation=interp) * (cell**roughness)
        cell /= 2.0
    out = out.reshape(-1, 3) @ rng.normal(0, 1, (3, 3)).astype(np.float32)  # random colour mixing
    out = out.reshape(h, w, 3)
    out -= out.mean(axis=(0, 1))
    out /= out.std() * rng.uniform(2.5, 6.0) + 1e-6
    return np.clip(out + rng.uniform(0.25, 0.75, 3).astype(np.float32), 0, 1)


def _photo_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random crop of a bundled photograph, rescaled, flipped and colour-jittered."""
    photos = _photo_textures()
    img = photos[rng.integers(len(photos))]
    ih, iw = img.shape[:2]
    scale = rng.uniform(0.3, 1.0)
    ch, cw = max(8, int(ih * scale)), max(8, int(iw * scale))
    y0, x0 = rng.integers(0, ih - ch + 1), rng.integers(0, iw - cw + 1)
    crop = img[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = np.ascontiguousarray(crop.transpose(1, 0, 2))
    crop = cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_LINEAR)
    gain = rng.uniform(0.6, 1.4, 3).astype(np.float32)
    return np.clip(crop * gain + rng.uniform(-0.15, 0.15), 0, 1)


def _smooth_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A weakly textured surface: a colour gradient with faint grain (hard for matching, as in life)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (xx * rng.uniform(-1, 1) / w + yy * rng.uniform(-1, 1) / h)[..., None]
    base = rng.uniform(0.2, 0.8, 3).astype(np.float32) + 0.3 * ramp * rng.uniform(-1, 1, 3)
    grain = rng.normal(0, rng.uniform(0.005, 0.03), (h, w, 1)).astype(np.float32)
    return np.clip(base + grain, 0, 1).astype(np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.random()
    if kind < 0.45:
        tex = _noise_texture(rng, h, w)
    elif kind < 0.92:
        tex = _photo_texture(rng, h, w)
    else:
        tex = _smooth_texture(rng, h, w)
    # Smooth shading fixed to the surface, so it moves with the layer in both views.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    shade = 1 + rng.uniform(-0.3, 0.3) * (xx / w - 0.5) + rng.uniform(-0.3, 0.3) * (yy / h - 0.5)
    return np.clip(tex * shade[..., None], 0, 1).astype(np.float32)


def _shape_mask(rng: np.random.Generator, h: int, w_ext: int, w: int) -> tuple[np.ndarray, tuple]:
    """A filled shape on the extended left-view canvas; returns the mask and its bounding box."""
    mask = np.zeros((h, w_ext), np.uint8)
    size = rng.uniform(0.04, 0.3) * min(h, w)
    cx, cy = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
    kind = rng.integers(3)
    if kind == 0:
        axes = (int(size * rng.uniform(0.5, 1.5)) + 1, int(size * rng.uniform(0.5, 1.5)) + 1)
        cv2.ellipse(mask, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    elif kind == 1:
        n = rng.integers(5, 13)
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = size * rng.uniform(0.4, 1.4, n)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    else:
        box = ((cx, cy), (size * rng.uniform(0.5, 2.5), size * rng.uniform(0.3, 2.0)), rng.uniform(0, 90))
        cv2.fillPoly(mask, [cv2.boxPoints(box).astype(np.int32)], 1)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return mask, None
    return mask, (xs.min(), xs.max(), ys.min(), ys.max())


@dataclass
class _Layer:
    texture: np.ndarray  # H x W_ext x 3, left-view coordinates
    mask: np.ndarray | None  # H x W_ext uint8, None = covers everything
    a: float  # disparity plane d = a + b*x + c*y (left-view coordinates)
    b: float
    c: float


def _plane_within(rng, box, d_lo, d_hi, slant_prob=0.6, max_slope=0.12):
    """A disparity plane whose values over `box` (x0, x1, y0, y1) stay inside [d_lo, d_hi]."""
    x0, x1, y0, y1 = box
    centre = rng.uniform(d_lo, d_hi)
    b = c = 0.0
    if rng.random() < slant_prob:
        b, c = rng.uniform(-max_slope, max_slope, 2)
        # Shrink the slopes until the plane stays in range over the whole box.
        for _ in range(30):
            corners = [centre + b * (x - (x0 + x1) / 2) + c * (y - (y0 + y1) / 2) for x in (x0, x1) for y in (y0, y1)]
            if min(corners) >= d_lo and max(corners) <= d_hi:
                break
            b, c = b * 0.7, c * 0.7
        else:
            b = c = 0.0
    a = centre - b * (x0 + x1) / 2 - c * (y0 + y1) / 2
    return float(a), float(b), float(c)


def _render_view(layers: list[_Layer], h: int, w: int, right: bool) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffer rendering of one view: colour and the disparity of the visible surface."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    colour = np.zeros((h, w, 3), np.float32)
    disp = np.full((h, w), -np.inf, np.float32)
    for layer in layers:
        # Left-view x of the surface point seen at each pixel of this view.
        x_left = (xx + layer.a + layer.c * yy) / (1.0 - layer.b) if right else xx
        d = layer.a + layer.b * x_left + layer.c * yy
        if layer.mask is None:
            covered = np.ones((h, w), bool)
        else:
            covered = cv2.remap(layer.mask, x_left, yy, cv2.INTER_NEAREST, borderValue=0) > 0
        nearer = covered & (d > disp)
        sampled = cv2.remap(layer.texture, x_left, yy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        colour[nearer] = sampled[nearer]
        disp[nearer] = d[nearer]
    return colour, disp


def _photometric(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Independent camera response per view: gain, bias, gamma and sensor noise."""
    img = img * rng.uniform(0.85, 1.15, 3).astype(np.float32) + rng.uniform(-0.05, 0.05)
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.15)
    img = img + rng.normal(0, rng.uniform(0, 0.02), img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def make_scene(seed: int, height: int = 256, width: int = 512, max_disparity: float = 90.0) -> StereoSample:
    """Render the stereo scene of `seed`: left/right RGB in [0, 1] and exact left-view disparity.

    Disparities lie in [0, max_disparity]. The background plane stays in the far half of the range;
    shapes are drawn in front of it with a random subset slanted.
    """
    rng = np.random.default_rng(seed)
    margin = int(np.ceil(max_disparity)) + 4
    w_ext = width + margin  # right view samples left-view x up to width - 1 + max_disparity
    full_box = (0, w_ext - 1, 0, height - 1)
    bg_hi = rng.uniform(0.05, 0.5) * max_disparity
    layers = [_Layer(_texture(rng, height, w_ext), None, *_plane_within(rng, full_box, 0.0, bg_hi, 0.7, 0.05))]
    for _ in range(rng.integers(3, 11)):
        mask, box = _shape_mask(rng, height, w_ext, width)
        if box is None:
            continue
        a, b, c = _plane_within(rng, box, rng.uniform(0, bg_hi), max_disparity)
        layers.append(_Layer(_texture(rng, height, w_ext), mask, a, b, c))
    left, disp_left = _render_view(layers, height, width, right=False)
    right, _ = _render_view(layers, height, width, right=True)
    if rng.random() < 0.3:  # shared slight defocus
        sigma = rng.uniform(0.3, 1.0)
        left, right = (cv2.GaussianBlur(v, (0, 0), sigma) for v in (left, right))
    return StereoSample(
        left=_photometric(rng, left),
        right=_photometric(rng, right),
        disparity=disp_left.astype(np.float32),
        name=f"synthetic-{seed}",
    )


def make_batch(seeds, height: int, width: int, max_disparity: float = 90.0) -> tuple[np.ndarray, ...]:
    """Scenes for `seeds` stacked as N x 3 x H x W images and N x H x W disparities (float32)."""
    scenes = [make_scene(int(s), height, width, max_disparity) for s in seeds]
    left = np.stack([s.left.transpose(2, 0, 1) for s in scenes])
    right = np.stack([s.right.transpose(2, 0, 1) for s in scenes])
    disp = np.stack([s.disparity for s in scenes])
    return left, right, disp
