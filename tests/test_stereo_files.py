"""Real and user stereo pairs load correctly, and bad files give clear errors."""

import cv2
import numpy as np
import pytest

from jpq_core.data.stereo_files import load_pair, middlebury_motorcycle, read_disparity
from jpq_core.errors import JPQError


def _write_png(path, img):
    assert cv2.imwrite(str(path), img)
    return path


def _write_pfm(path, disp):
    header = f"Pf\n{disp.shape[1]} {disp.shape[0]}\n-1.0\n".encode()
    path.write_bytes(header + np.flipud(disp).astype("<f4").tobytes())
    return path


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    left = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    right = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    return _write_png(tmp_path / "l.png", left), _write_png(tmp_path / "r.png", right), left


def test_middlebury_pair_has_ground_truth_with_inf_for_unknown():
    s = middlebury_motorcycle()
    assert s.left.shape == s.right.shape == (500, 741, 3)
    assert s.disparity.shape == (500, 741)
    valid = np.isfinite(s.disparity)
    assert 0.85 < valid.mean() < 0.99
    assert 5 < s.disparity[valid].min() and s.disparity[valid].max() < 64


def test_user_pair_is_rgb_in_unit_range(pair):
    l, r, left = pair
    s = load_pair(l, r)
    assert s.left.shape == (40, 60, 3) and s.disparity is None
    np.testing.assert_allclose(s.left[..., 0], left[..., 2] / 255.0, atol=1e-6)  # BGR on disk -> RGB


@pytest.mark.parametrize("fmt", ["pfm", "npy", "png"])
def test_ground_truth_formats_agree(tmp_path, pair, fmt):
    l, r, _ = pair
    disp = np.round(np.random.default_rng(1).uniform(1, 50, (40, 60)) * 4) / 4  # exact in 16-bit PNG * 256
    disp[0, 0] = np.inf
    if fmt == "pfm":
        gt = _write_pfm(tmp_path / "d.pfm", disp.astype(np.float32))
    elif fmt == "npy":
        gt = tmp_path / "d.npy"
        np.save(gt, disp)
    else:
        raw = np.where(np.isfinite(disp), disp * 256, 0).astype(np.uint16)
        gt = _write_png(tmp_path / "d.png", raw)
    s = load_pair(l, r, gt)
    assert np.isinf(s.disparity[0, 0])
    np.testing.assert_allclose(s.disparity[1:], disp[1:], rtol=1e-6)


def test_truncated_image_is_refused(tmp_path, pair):
    l, r, _ = pair
    bad = tmp_path / "bad.png"
    bad.write_bytes(l.read_bytes()[:60])
    with pytest.raises(JPQError, match="not a readable image"):
        load_pair(bad, r)


def test_pairs_of_different_sizes_are_refused(tmp_path, pair):
    l, _, _ = pair
    r = _write_png(tmp_path / "small.png", np.zeros((40, 50, 3), np.uint8))
    with pytest.raises(JPQError, match="differ in size"):
        load_pair(l, r)


def test_ground_truth_of_wrong_size_or_format_is_refused(tmp_path, pair):
    l, r, _ = pair
    np.save(tmp_path / "d.npy", np.zeros((10, 10)))
    with pytest.raises(JPQError, match="ground truth is 10x10"):
        load_pair(l, r, tmp_path / "d.npy")
    (tmp_path / "d.txt").write_text("1 2 3")
    with pytest.raises(JPQError, match="unknown ground-truth format"):
        read_disparity(tmp_path / "d.txt")
    (tmp_path / "e.pfm").write_bytes(b"PF\n2 2\n-1\n" + bytes(48))
    with pytest.raises(JPQError, match="not a valid PFM"):
        read_disparity(tmp_path / "e.pfm")
