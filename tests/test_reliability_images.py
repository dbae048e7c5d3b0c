"""Uploaded stereo pairs and ground truth: every bad file is a clear JPQError, every odd-but-valid one loads.

Inputs are built in memory the way a user's files arrive (bytes, as the app's uploads; files, as the CLI's).
"""

import io
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

from jpq_core.data import stereo_files
from jpq_core.data.stereo_files import MAX_IMAGE_PIXELS, decode_disparity, decode_image, load_pair, pair_from_bytes
from jpq_core.cli import main
from jpq_core.errors import JPQError


def encode(img, ext=".png", **params):
    ok, buf = cv2.imencode(ext, img, [v for kv in params.items() for v in kv])
    assert ok
    return buf.tobytes()


def npy(array):
    f = io.BytesIO()
    np.save(f, array)
    return f.getvalue()


def pfm(disp):
    return f"Pf\n{disp.shape[1]} {disp.shape[0]}\n-1.0\n".encode() + np.flipud(disp).astype("<f4").tobytes()


def png_bomb(width, height):
    """A small, valid 8-bit grey PNG of width x height zeros (a decompression bomb: kilobytes on disk)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def bgr():
    return (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("data", [b"", b"hello, this is text", b"%PDF-1.7\n" + bytes(500), b"PK\x03\x04" + bytes(100),
                                  b"\x89PNG\r\n\x1a\n" + bytes(30), b"\xff\xd8\xff\xe0" + bytes(30)])
def test_non_image_bytes_are_refused(data):
    with pytest.raises(JPQError, match="not a readable image"):
        decode_image(data, "left.png")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
@pytest.mark.parametrize("keep", [0.2, 0.6, 0.98])
def test_truncated_png_and_jpeg_are_refused_not_half_shown(bgr, ext, keep):
    data = encode(bgr, ext)
    with pytest.raises(JPQError, match=r"left.*not a readable image.*truncated"):
        decode_image(data[: int(len(data) * keep)], "left" + ext)


def test_unsupported_image_format_names_the_format():
    from PIL import Image

    f = io.BytesIO()
    Image.new("RGB", (32, 32)).save(f, "GIF")
    with pytest.raises(JPQError, match="GIF images are not supported; save it as PNG or JPEG"):
        decode_image(f.getvalue(), "left.gif")


def test_pair_of_different_sizes_is_refused_from_the_headers(bgr, monkeypatch):
    monkeypatch.setattr(stereo_files.cv2, "imdecode", lambda *a: pytest.fail("decoded before the sizes were compared"))
    with pytest.raises(JPQError, match=r"left image \(60x40\) and right image \(50x40\) differ in size"):
        pair_from_bytes(encode(bgr), encode(bgr[:, :50]))


def test_grey_with_colour_makes_both_grey_and_says_so(bgr):
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    s = pair_from_bytes(encode(bgr), encode(grey))
    assert s.left.shape == s.right.shape == (40, 60, 3)
    for img in (s.left, s.right):  # three equal channels
        assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    np.testing.assert_allclose(s.left[..., 0], grey / 255.0, atol=1 / 255 + 1e-6)  # the same luma as OpenCV's
    assert s.notices == ("The right image is greyscale, so both images are used in grey.",)
    colour = pair_from_bytes(encode(bgr), encode(bgr))
    assert colour.notices == () and not np.array_equal(colour.left[..., 0], colour.left[..., 1])


def test_16_bit_png_keeps_its_precision(bgr):
    img16 = bgr.astype(np.uint16) * 257 + np.arange(60, dtype=np.uint16)[None, :, None]  # values 8 bits cannot hold
    out = decode_image(encode(img16), "left.png")
    assert out.dtype == np.float32 and out.shape == (40, 60, 3)
    np.testing.assert_allclose(out, img16[:, :, ::-1] / 65535.0, atol=1e-6)
    assert len(np.unique(out)) > len(np.unique(bgr))


@pytest.mark.parametrize("channels", [2, 4])
def test_alpha_is_dropped(bgr, channels):
    if channels == 4:
        img, expected = np.dstack([bgr, np.full((40, 60), 7, np.uint8)]), bgr[:, :, ::-1] / 255.0
    else:  # grey + alpha, written by Pillow (OpenCV cannot write two channels)
        from PIL import Image

        f = io.BytesIO()
        Image.fromarray(np.dstack([bgr[..., 0], bgr[..., 1]]), "LA").save(f, "PNG")
        img, expected = None, np.repeat(bgr[..., :1] / 255.0, 3, axis=2)
    out = decode_image(encode(img) if img is not None else f.getvalue(), "left.png")
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    bomb = png_bomb(8000, 6000)  # 48 megapixels in
    assert len(bomb) < 100_000 and 8000 * 6000 > MAX_IMAGE_PIXELS
    monkeypatch.setattr(stereo_files.cv2, "imdecode", lambda *a: pytest.fail("a bomb reached the decoder"))
    with pytest.raises(JPQError, match=r"big.png: 8000x6000 is more than 40,000,000 pixels; refused before decoding"):
        decode_image(bomb, "big.png")


def test_large_pair_is_downscaled_with_a_notice_and_ground_truth_follows():
    h, w = 1000, 1500  # 1.5 MP, over the 1 MP working size
    x = np.tile(np.arange(w, dtype=np.float32) % 256, (h, 1))
    img = np.dstack([x, x[::-1], np.full((h, w), 9, np.float32)]).astype(np.uint8)
    disp = np.full((h, w), 30.0, np.float32)
    disp[:, :10] = np.inf  # unknown stays unknown
    s = pair_from_bytes(encode(img), encode(img), npy(disp))
    nh, nw = s.left.shape[:2]
    assert nh * nw <= stereo_files.MAX_WORKING_PIXELS and abs(nw / nh - 1.5) < 0.01
    assert s.disparity.shape == (nh, nw) and s.right.shape == s.left.shape
    assert np.allclose(s.disparity[:, 20:], 30.0 * nw / w)  # disparities shrink with the image
    assert np.isinf(s.disparity[:, 0]).all()
    assert s.notices == (f"The pair (1500x1000) was downscaled to {nw}x{nh} (at most 1,000,000 pixels); "
                         "disparities are in pixels of the smaller images.",)
    full = pair_from_bytes(encode(img), encode(img), max_pixels=None)
    assert full.left.shape == (h, w, 3) and full.notices == ()


def test_tiny_images_are_refused_with_the_minimum():
    with pytest.raises(JPQError, match=r"left.png: 12x8 is too small for the stereo network; both sides must be at least 16 px"):
        decode_image(encode(np.zeros((8, 12, 3), np.uint8)), "left.png")


def test_smallest_accepted_pair_runs_through_the_network():
    from jpq_core.evaluation import predict_disparity
    from jpq_core.models import load_network

    img = encode((np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8))
    out = predict_disparity(load_network("stereo"), pair_from_bytes(img, img))
    assert out.shape == (16, 16) and np.isfinite(out).all()


@pytest.mark.parametrize("data, message", [
    (npy(np.zeros((40, 61))), "ground truth is 61x40 but the images are 60x40"),
    (npy(np.zeros((40, 60, 3))), "must be a 2-D array of real numbers"),
    (npy(np.zeros((40, 60), complex)), "must be a 2-D array of real numbers"),
    (npy(np.array([["a"] * 60] * 40)), "must be a 2-D array of real numbers"),
    (npy(np.zeros((40, 60)))[:-100], "not a plain NumPy array file"),
    (encode(np.zeros((40, 60), np.uint8)), "must be a single-channel 16-bit image.*this one is uint8"),
    (encode(np.ones((40, 60, 3), np.uint16)), "must be a single-channel 16-bit image.*3 channel"),
    (pfm(np.ones((40, 60), np.float32))[:-8], "truncated: 9592 bytes for 60x40 floats"),
    (b"PF\n60 40\n-1\n" + bytes(60 * 40 * 12), "only single-channel 'Pf'"),
    (b"Pf\nsixty forty\n-1\n", "no 'Pf WIDTH HEIGHT SCALE' header"),
    (b"width,height\n60,40\n", "unknown ground-truth format"),
])
def test_ground_truth_of_wrong_size_or_format_says_what_is_wrong(bgr, data, message):
    with pytest.raises(JPQError, match=message):
        pair_from_bytes(encode(bgr), encode(bgr), data)


def test_pickled_ground_truth_is_never_unpickled(tmp_path, code_running_object):
    target = tmp_path / "pwned.txt"
    data = npy(np.array([code_running_object(target)], dtype=object))
    with pytest.raises(JPQError, match="must be a 2-D array of real numbers"):
        decode_disparity(data, "gt.npy")
    assert not target.exists()


def test_npy_header_claiming_a_huge_array_is_refused_before_reading():
    header = npy(np.zeros((2, 2), np.float32)).replace(b"(2, 2)", b"(99999, 99999)")
    with pytest.raises(JPQError, match="99999x99999 is more than 40,000,000 pixels"):
        decode_disparity(header, "gt.npy")


def test_nan_and_inf_in_ground_truth_are_unknown_pixels_and_all_unknown_is_refused(bgr):
    disp = np.full((40, 60), 12.5, np.float32)
    disp[0, 0], disp[0, 1], disp[0, 2] = np.nan, np.inf, -3.0
    for data in (npy(disp), pfm(disp)):
        s = pair_from_bytes(encode(bgr), encode(bgr), data)
        assert np.isinf(s.disparity[0, :3]).all() and (s.disparity.ravel()[3:] == 12.5).all()
    with pytest.raises(JPQError, match="no known pixel"):
        decode_disparity(npy(np.full((40, 60), np.nan)), "gt.npy")
    with pytest.raises(JPQError, match="no known pixel"):
        decode_disparity(encode(np.zeros((40, 60), np.uint16)), "gt.png")  # 0 = unknown in KITTI PNGs


def test_png_ground_truth_scale_must_be_positive(bgr):
    with pytest.raises(JPQError, match="scale must be a positive number, got 0"):
        decode_disparity(encode(np.ones((40, 60), np.uint16)), "gt.png", png_scale=0)


def test_missing_and_oversized_files_are_clear(tmp_path, bgr, monkeypatch):
    (tmp_path / "l.png").write_bytes(encode(bgr))
    with pytest.raises(JPQError, match="no such image file"):
        load_pair(tmp_path / "l.png", tmp_path / "nope.png")
    monkeypatch.setattr(stereo_files, "MAX_FILE_BYTES", 100)
    with pytest.raises(JPQError, match="over the 0 MiB limit for image files"):
        load_pair(tmp_path / "l.png", tmp_path / "l.png")


@pytest.mark.parametrize("case", ["non-image", "truncated", "sizes", "gt-format", "gt-size"])
def test_cli_evaluate_prints_one_error_line_and_exits_2(tmp_path, bgr, case, capsys):
    left, right, gt = tmp_path / "l.png", tmp_path / "r.png", tmp_path / "gt.npy"
    left.write_bytes(encode(bgr))
    right.write_bytes(encode(bgr))
    np.save(gt, np.ones((40, 60), np.float32))
    expected = {"non-image": ("r.png: not a readable image", lambda: right.write_text("not an image")),
                "truncated": ("r.png: not a readable image", lambda: right.write_bytes(encode(bgr)[:300])),
                "sizes": ("differ in size", lambda: right.write_bytes(encode(bgr[:, :50]))),
                "gt-format": ("gt.npy: unknown ground-truth format", lambda: gt.write_text("1 2 3")),
                "gt-size": ("ground truth is 60x39", lambda: np.save(gt, np.ones((39, 60), np.float32)))}[case]
    expected[1]()
    assert main(["evaluate", "--left", str(left), "--right", str(right), "--gt", str(gt)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and expected[0] in err and len(err.splitlines()) == 1


def test_cli_process_exit_status_and_stderr_for_a_bad_upload(root, tmp_path, bgr):
    (tmp_path / "l.png").write_bytes(encode(bgr))
    (tmp_path / "r.png").write_bytes(encode(bgr)[:300])
    proc = subprocess.run([sys.executable, "-m", "jpq_core", "evaluate", "--left", str(tmp_path / "l.png"),
                           "--right", str(tmp_path / "r.png")], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'r.png'}: not a readable image (PNG or JPEG expected); "
                                                "the file may be truncated or corrupt."]
