"""Real stereo pairs: the Middlebury 2014 motorcycle pair shipped with scikit-image, and user files.

User pairs are two images (PNG, JPEG, BMP, TIFF or WebP; 8 or 16 bits; grey, colour or with alpha) with
optional ground truth as PFM (Middlebury's format, `inf` = unknown), 16-bit PNG with a scale (KITTI stores
disparity * 256; 0 = unknown) or NPY (read with allow_pickle=False). Files are untrusted:
- the image header is read first (Pillow, no pixels decoded) and anything declaring more than
  MAX_IMAGE_PIXELS is refused before decoding, so a small "decompression bomb" cannot take the memory;
- pixels are decoded by OpenCV, never executed; a truncated or corrupt file is refused, not half-shown;
- pairs above MAX_WORKING_PIXELS are downscaled by area averaging (ground truth by nearest neighbour, its
  values scaled by the same factor, since disparity is measured in pixels), and the sample's `notices` say so;
- if one image is grey and the other colour, both are used in grey, so the network compares like with like.
Every problem raises `JPQError` saying what was wrong and what to do.
"""

from __future__ import annotations

import io
import math
import re
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from jpq_core.data.stereo_types import StereoSample
from jpq_core.errors import JPQError
from jpq_core.untrusted import decoding

MAX_IMAGE_PIXELS = 40_000_000  # refused from the header, before decoding: about 480 MB as float RGB
MAX_WORKING_PIXELS = 1_000_000  # bigger pairs are downscaled: the network's 96 px disparity range and CPU time
MAX_FILE_BYTES = 200 * 2**20  # Streamlit's own upload limit
MIN_IMAGE_SIDE = 16  # the network works at 1/4 resolution and pads to multiples of 8
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
NPY_ADVICE = "save the array again with numpy.save, or give the disparity as .pfm or a 16-bit .png."
_PFM_HEADER = re.compile(rb"(P[Ff])\s+(\d+)\s+(\d+)\s+(\S+)\s")
# OpenCV logs a warning for every corrupt file it is given; our JPQError says it once, in words a user follows.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


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


def _read_file(path: Path | str, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise JPQError(f"{path}: no such {what} file; check the path.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise JPQError(f"{path}: {size / 2**20:.0f} MiB is over the {MAX_FILE_BYTES // 2**20} MiB limit for {what} files.")
    return path.read_bytes()


def _check_pixels(width: int, height: int, label: str, min_side: int = MIN_IMAGE_SIDE) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise JPQError(f"{label}: {width}x{height} is more than {MAX_IMAGE_PIXELS:,} pixels; refused before decoding. "
                       "Downscale it first (the network works at about 1 megapixel).")
    if min(width, height) < min_side:
        raise JPQError(f"{label}: {width}x{height} is too small for the stereo network; both sides must be at least {min_side} px.")


def _decoding_image(label: str, advice: str = "the file may be truncated or of another type."):
    """Pillow's and OpenCV's errors on bad bytes say nothing a user can act on (and name memory addresses)."""
    return decoding(label, "not a readable image", advice, describe=lambda exc: "PNG or JPEG expected")


def image_size(data: bytes, label: str = "image", min_side: int = MIN_IMAGE_SIDE) -> tuple[int, int]:
    """(width, height) from the image header alone, checked against the size limits; nothing is decoded."""
    with _decoding_image(label):
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
        except Image.DecompressionBombError:  # Pillow's own size check: say so, not "not readable"
            raise JPQError(f"{label}: declares more than {MAX_IMAGE_PIXELS:,} pixels; refused before decoding. Downscale it first.") from None
    if fmt not in IMAGE_FORMATS:
        raise JPQError(f"{label}: {fmt} images are not supported; save it as PNG or JPEG ({', '.join(IMAGE_FORMATS)} are read).")
    _check_pixels(width, height, label, min_side)
    return width, height


def working_size(height: int, width: int, max_pixels: int | None = MAX_WORKING_PIXELS) -> tuple[int, int]:
    """(height, width) scaled by one factor to at most `max_pixels` (unchanged if smaller or max_pixels is None)."""
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    f = math.sqrt(max_pixels / (height * width))
    return max(MIN_IMAGE_SIDE, int(height * f)), max(MIN_IMAGE_SIDE, int(width * f))


def _bgr(img: np.ndarray, label: str) -> np.ndarray:
    """Any OpenCV decoding (grey, grey+alpha, BGR, BGRA) -> H x W x 3 BGR; alpha is dropped."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] in (1, 2):
        return np.repeat(img[:, :, :1], 3, axis=2)
    if img.shape[2] in (3, 4):
        return img[:, :, :3]
    raise JPQError(f"{label}: {img.shape[2]} colour channels; give a grey, RGB or RGBA image.")


def _check_png_chunks(data: bytes, label: str) -> None:
    """Refuse a PNG whose chunk lengths run past the end of the file, before OpenCV reads it: libpng
    allocates what a chunk claims, so a 4 KB file claiming a 512 MB IDAT cost 0.6 GB and 3 s (found by
    scripts/fuzz.py)."""
    at = 8  # after the signature: (length, type, data, CRC) chunks
    while at + 8 <= len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        if at + 12 + length > len(data):
            raise JPQError(f"{label}: not a readable image (PNG or JPEG expected); the file may be truncated or corrupt.")
        if data[at + 4:at + 8] == b"IEND":
            return
        at += 12 + length


def _imdecode(data: bytes, label: str) -> np.ndarray | None:
    """OpenCV's decoding of untrusted bytes (None when it cannot), its errors as JPQError."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png_chunks(data, label)
    with _decoding_image(label, "the file may be truncated or corrupt."):
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def decode_image(data: bytes, label: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes to H x W x 3 float32 RGB in [0, 1], downscaled to at most `max_pixels` if given."""
    width, height = image_size(data, label)
    damaged = "the file may be truncated or corrupt."
    img = _imdecode(data, label)
    if img is None or img.shape[:2] != (height, width):
        raise JPQError(f"{label}: not a readable image (PNG or JPEG expected); {damaged}")
    if img.dtype not in (np.uint8, np.uint16):
        raise JPQError(f"{label}: {img.dtype} pixels are not supported; save it as an 8- or 16-bit PNG or a JPEG.")
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    img = _bgr(img, label)
    size = working_size(height, width, max_pixels)
    if size != (height, width):  # resize the integer image: a quarter of the float copy's memory
        with _decoding_image(label, damaged):
            img = cv2.resize(img, size[::-1], interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img[:, :, ::-1], dtype=np.float32) / np.float32(scale)  # OpenCV decodes BGR


def read_pfm(data: bytes, label: str = "PFM file") -> np.ndarray:
    """Parse a single-channel PFM (Pf header; negative scale = little-endian); rows are stored bottom-up."""
    def invalid(why: str) -> JPQError:
        return JPQError(f"{label}: not a valid PFM disparity file ({why}).")

    head = _PFM_HEADER.match(data[:256])
    if head is None:
        raise invalid("no 'Pf WIDTH HEIGHT SCALE' header")
    if head[1] != b"Pf":
        raise invalid("only single-channel 'Pf' files hold disparity, this is a 3-channel 'PF'")
    with decoding(label, "not a valid PFM disparity file", "save it again, or give the disparity as .npy or a 16-bit .png."):
        width, height, scale = int(head[2]), int(head[3]), float(head[4])
        _check_pixels(width, height, label, min_side=1)  # ground truth: its size is compared with the images'
        raster = data[head.end():]
        if len(raster) < 4 * width * height:
            raise invalid(f"truncated: {len(raster)} bytes for {width}x{height} floats")
        values = np.frombuffer(raster, dtype="<f4" if scale < 0 else ">f4", count=width * height)
        return np.flipud(values.reshape(height, width)).astype(np.float32)


def _read_npy(data: bytes, label: str) -> np.ndarray:
    """A 2-D numeric NPY array; the header's shape is checked before any data is read."""
    f = io.BytesIO(data)
    with decoding(label, "not a plain NumPy array file", NPY_ADVICE):  # numpy's header parser raises TokenError, SyntaxError, ...
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if len(shape) != 2 or dtype.hasobject or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            raise JPQError(f"{label}: ground truth must be a 2-D array of real numbers, got {dtype} {shape}.")
        _check_pixels(shape[1], shape[0], label, min_side=1)
        return np.load(io.BytesIO(data), allow_pickle=False)


def _read_png_disparity(data: bytes, label: str, png_scale: float) -> np.ndarray:
    image_size(data, label, min_side=1)
    raw = _imdecode(data, label)
    if raw is None or raw.ndim != 2 or raw.dtype != np.uint16:
        kind = "unreadable" if raw is None else f"{raw.dtype} with {1 if raw.ndim == 2 else raw.shape[2]} channel(s)"
        raise JPQError(f"{label}: ground-truth PNG must be a single-channel 16-bit image of disparity * {png_scale:g} "
                       f"(KITTI style), this one is {kind}; or give the disparity as .pfm or .npy.")
    disp = raw.astype(np.float32) / png_scale
    disp[raw == 0] = np.inf
    return disp


def decode_disparity(data: bytes, label: str = "ground truth", png_scale: float = 256.0) -> np.ndarray:
    """Ground-truth disparity from PFM, NPY or 16-bit PNG bytes (format by content) -> H x W float32, inf = unknown.

    NaN, inf and negative values are unknown; a map with no known pixel is refused (nothing could be scored).
    """
    if not (math.isfinite(png_scale) and png_scale > 0):
        raise JPQError(f"the PNG ground-truth scale must be a positive number, got {png_scale}; KITTI uses 256.")
    if data.startswith(b"\x93NUMPY"):
        disp = _read_npy(data, label)
    elif data[:2] in (b"Pf", b"PF"):
        disp = read_pfm(data, label)
    elif data.startswith(b"\x89PNG"):
        disp = _read_png_disparity(data, label, png_scale)
    else:
        raise JPQError(f"{label}: unknown ground-truth format (the content is not PFM, NPY or PNG); use .pfm, .npy or a 16-bit .png.")
    with np.errstate(invalid="ignore", over="ignore"):
        disp = disp.astype(np.float32)
        disp[~np.isfinite(disp) | (disp < 0)] = np.inf
    if not np.isfinite(disp).any():
        raise JPQError(f"{label}: the ground truth has no known pixel (all NaN, inf, negative or 0 in a PNG); nothing can be scored.")
    return disp


def read_disparity(path: Path | str, png_scale: float = 256.0) -> np.ndarray:
    """Ground-truth disparity from a PFM, NPY or 16-bit PNG file (see `decode_disparity`)."""
    return decode_disparity(_read_file(path, "ground-truth"), str(path), png_scale)


def _is_grey(img: np.ndarray) -> bool:
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))


def _as_grey(img: np.ndarray) -> np.ndarray:
    return np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)


def pair_from_bytes(left: bytes, right: bytes, gt: bytes | None = None, *, labels=("left image", "right image", "ground-truth file"),
                    png_scale: float = 256.0, max_pixels: int | None = MAX_WORKING_PIXELS, name: str = "user-pair") -> StereoSample:
    """A user stereo pair (and optional ground truth) from file contents, as the app receives uploads.

    Sizes are compared from the headers before anything is decoded; pairs over `max_pixels` are downscaled
    and the sample's `notices` say so, as they do when a grey image makes both images grey.
    """
    (w, h), (wr, hr) = image_size(left, labels[0]), image_size(right, labels[1])
    if (w, h) != (wr, hr):
        raise JPQError(f"{labels[0]} ({w}x{h}) and {labels[1]} ({wr}x{hr}) differ in size; a rectified pair has equal sizes. Crop or resize one to match.")
    disp = None
    if gt is not None:
        disp = decode_disparity(gt, labels[2], png_scale)
        if disp.shape != (h, w):
            raise JPQError(f"{labels[2]}: ground truth is {disp.shape[1]}x{disp.shape[0]} but the images are {w}x{h}; give the map of this pair.")
    left_img, right_img = decode_image(left, labels[0], max_pixels), decode_image(right, labels[1], max_pixels)
    notices = []
    if left_img.shape[:2] != (h, w):
        nh, nw = left_img.shape[:2]
        notices.append(f"The pair ({w}x{h}) was downscaled to {nw}x{nh} (at most {max_pixels:,} pixels); "
                       "disparities are in pixels of the smaller images.")
        if disp is not None:
            disp = cv2.resize(disp, (nw, nh), interpolation=cv2.INTER_NEAREST) * np.float32(nw / w)
    grey = [_is_grey(left_img), _is_grey(right_img)]
    if grey[0] != grey[1]:
        notices.append(f"The {labels[grey.index(True)]} is greyscale, so both images are used in grey.")
        left_img, right_img = _as_grey(left_img), _as_grey(right_img)
    return StereoSample(left_img, right_img, disp, name=name, notices=tuple(notices))


def load_pair(left: Path | str, right: Path | str, gt: Path | str | None = None, png_scale: float = 256.0,
              max_pixels: int | None = MAX_WORKING_PIXELS) -> StereoSample:
    """A user stereo pair from files (see `pair_from_bytes`)."""
    return pair_from_bytes(
        _read_file(left, "image"), _read_file(right, "image"), None if gt is None else _read_file(gt, "ground-truth"),
        labels=(str(left), str(right), str(gt)), png_scale=png_scale, max_pixels=max_pixels, name=Path(left).stem,
    )
