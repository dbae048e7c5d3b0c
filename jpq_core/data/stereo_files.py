"""Real stereo pairs: the Middlebury 2014 motorcycle pair shipped with scikit-image, and user files.

User pairs are two images (PNG or JPEG, decoded with OpenCV, never executed) with optional ground truth as
PFM (Middlebury's format, `inf` = unknown), PNG with a scale (KITTI stores disparity * 256 in 16 bits; 0 =
unknown), or NPY (loaded with allow_pickle=False).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from jpq_core.data.stereo_types import StereoSample
from jpq_core.errors import JPQError

MAX_IMAGE_PIXELS = 40_000_000  # bigger images are refused before decoding fully
MIN_IMAGE_SIDE = 16


@lru_cache(maxsize=1)
def _middlebury_arrays():
    from skimage import data

    left, right, disp = data.stereo_motorcycle()
    return left, right, disp


def middlebury_motorcycle() -> StereoSample:
    """Middlebury 2014 'Motorcycle' (quarter size, 741x500), ground truth with inf where unknown."""
    left, right, disp = _middlebury_arrays()
    return StereoSample(
        left=left.astype(np.float32) / 255.0,
        right=right.astype(np.float32) / 255.0,
        disparity=disp.astype(np.float32).copy(),
        name="middlebury-motorcycle",
    )


def read_image(path: Path | str) -> np.ndarray:
    """Decode an image file to H x W x 3 float32 RGB in [0, 1] (8- or 16-bit, grey or colour)."""
    path = Path(path)
    if not path.is_file():
        raise JPQError(f"{path}: no such image file; check the path.")
    return decode_image(path.read_bytes(), str(path))


def decode_image(data: bytes, label: str = "image") -> np.ndarray:
    """Decode image bytes (PNG/JPEG/...) to H x W x 3 float32 RGB in [0, 1]."""
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise JPQError(f"{label}: not a readable image (PNG or JPEG expected); the file may be truncated or of another type.")
    if img.shape[0] * img.shape[1] > MAX_IMAGE_PIXELS:
        raise JPQError(f"{label}: {img.shape[1]}x{img.shape[0]} is larger than {MAX_IMAGE_PIXELS:,} pixels; downscale it first.")
    if min(img.shape[:2]) < MIN_IMAGE_SIDE:
        raise JPQError(f"{label}: {img.shape[1]}x{img.shape[0]} is too small; both sides must be at least {MIN_IMAGE_SIDE} px.")
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    img = img.astype(np.float32) / scale
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[:, :, ::-1])  # OpenCV decodes BGR


def read_pfm(data: bytes, label: str = "PFM file") -> np.ndarray:
    """Parse a single-channel PFM (Pf header); rows are stored bottom-up."""
    try:
        header, rest = data.split(b"\n", 1)
        dims, rest = rest.split(b"\n", 1)
        scale_line, raster = rest.split(b"\n", 1)
        if header.strip() != b"Pf":
            raise ValueError("only single-channel 'Pf' files hold disparity")
        width, height = (int(v) for v in dims.split())
        scale = float(scale_line)
        dtype = "<f4" if scale < 0 else ">f4"
        values = np.frombuffer(raster, dtype=dtype, count=width * height)
    except ValueError as exc:
        raise JPQError(f"{label}: not a valid PFM disparity file ({exc}).") from None
    return np.flipud(values.reshape(height, width)).astype(np.float32)


def read_disparity(path: Path | str, png_scale: float = 256.0) -> np.ndarray:
    """Ground-truth disparity from PFM, NPY or 16-bit PNG (value / png_scale; 0 = unknown) -> inf = unknown."""
    path = Path(path)
    if not path.is_file():
        raise JPQError(f"{path}: no such ground-truth file; check the path.")
    suffix = path.suffix.lower()
    if suffix == ".pfm":
        disp = read_pfm(path.read_bytes(), str(path))
    elif suffix == ".npy":
        try:
            disp = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise JPQError(f"{path}: not a plain NumPy array file ({exc}).") from None
        if disp.ndim != 2 or not np.issubdtype(disp.dtype, np.number):
            raise JPQError(f"{path}: ground truth must be a 2-D numeric array, got {disp.dtype} {disp.shape}.")
    elif suffix == ".png":
        raw = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
        if raw is None or raw.ndim != 2:
            raise JPQError(f"{path}: ground-truth PNG must be a single-channel (16-bit) image of disparity * {png_scale:g}.")
        disp = raw.astype(np.float32) / png_scale
        disp[raw == 0] = np.inf
    else:
        raise JPQError(f"{path}: unknown ground-truth format {suffix!r}; use .pfm, .npy or a 16-bit .png.")
    disp = disp.astype(np.float32)
    disp[~np.isfinite(disp) | (disp < 0)] = np.inf
    return disp


def load_pair(left: Path | str, right: Path | str, gt: Path | str | None = None, png_scale: float = 256.0) -> StereoSample:
    """A user stereo pair from files, checked for matching sizes."""
    left_img, right_img = read_image(left), read_image(right)
    if left_img.shape != right_img.shape:
        raise JPQError(f"left {left_img.shape[1]}x{left_img.shape[0]} and right {right_img.shape[1]}x{right_img.shape[0]} differ in size; a rectified pair has equal sizes.")
    disp = None
    if gt is not None:
        disp = read_disparity(gt, png_scale)
        if disp.shape != left_img.shape[:2]:
            raise JPQError(f"{gt}: ground truth is {disp.shape[1]}x{disp.shape[0]} but the images are {left_img.shape[1]}x{left_img.shape[0]}.")
    return StereoSample(left_img, right_img, disp, name=Path(left).stem)
