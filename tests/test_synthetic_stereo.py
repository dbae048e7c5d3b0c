"""The synthetic generator's geometry is exact: what users train and validate on must be true."""

import numpy as np
import torch
import pytest

from jpq_core.data.synthetic_stereo import VALIDATION_SEED_BASE, _Layer, _render_view, make_scene, scene_seed

H, W, EXT = 64, 128, 128 + 64


def _layer(rng, a, b=0.0, c=0.0, box=None):
    texture = rng.random((H, EXT, 3)).astype(np.float32)
    mask = None
    if box is not None:
        mask = np.zeros((H, EXT), np.uint8)
        x0, x1, y0, y1 = box
        mask[y0:y1, x0:x1] = 1
    return _Layer(texture, mask, a, b, c)


def test_fronto_parallel_shape_is_shifted_by_its_disparity():
    rng = np.random.default_rng(0)
    layers = [_layer(rng, 5.0), _layer(rng, 20.0, box=(50, 100, 10, 50))]
    left, disp = _render_view(layers, H, W, right=False)
    right, _ = _render_view(layers, H, W, right=True)
    assert np.all(disp[10:50, 50:100] == 20.0)
    assert np.all(disp[:10] == 5.0)
    # Inside the shape, left pixel x is right pixel x - 20.
    np.testing.assert_allclose(right[12:48, 32:78], left[12:48, 52:98], atol=1e-5)
    # The background, visible in both, is shifted by 5.
    np.testing.assert_allclose(right[55:, 0:100], left[55:, 5:105], atol=1e-5)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_nearer_surface_occludes_whatever_the_drawing_order(order):
    rng = np.random.default_rng(1)
    far = _layer(rng, 10.0, box=(20, 80, 10, 40))
    near = _layer(rng, 30.0, box=(60, 110, 20, 50))
    layers = [_layer(rng, 2.0)] + [[far, near][i] for i in order]
    left, disp = _render_view(layers, H, W, right=False)
    assert np.all(disp[20:40, 60:80] == 30.0)  # the overlap shows the near shape
    np.testing.assert_allclose(left[20:40, 60:80], near.texture[20:40, 60:80])


def test_slanted_plane_maps_exactly_between_views():
    texture = np.repeat(np.linspace(0, 1, EXT, dtype=np.float32)[None, :, None], H, 0).repeat(3, 2)
    layers = [_Layer(texture, None, a=8.0, b=0.1, c=0.05)]
    left, disp = _render_view(layers, H, W, right=False)
    right, _ = _render_view(layers, H, W, right=True)
    yy, xx = np.mgrid[0:H, 0:W]
    np.testing.assert_allclose(disp, 8.0 + 0.1 * xx + 0.05 * yy, rtol=1e-6)
    # Sample the right view at x - d(x): it must equal the left view (texture linear in x, so exact).
    x_right = xx - disp
    ok = (x_right >= 0) & (x_right <= W - 1)
    sampled = np.array([np.interp(x_right[y][ok[y]], np.arange(W), right[y, :, 0]) for y in range(H)], dtype=object)
    for y in range(H):
        np.testing.assert_allclose(sampled[y], left[y, ok[y], 0], atol=1e-4)


def test_scenes_are_deterministic_and_in_range():
    a, b = make_scene(7, 96, 192, 60.0), make_scene(7, 96, 192, 60.0)
    np.testing.assert_array_equal(a.left, b.left)
    np.testing.assert_array_equal(a.disparity, b.disparity)
    assert not np.array_equal(a.left, make_scene(8, 96, 192, 60.0).left)
    assert a.left.shape == (96, 192, 3) and a.disparity.shape == (96, 192)
    assert 0.0 <= a.disparity.min() and a.disparity.max() <= 60.0
    assert 0.0 <= a.left.min() and a.left.max() <= 1.0


def test_train_and_validation_seeds_never_meet():
    assert scene_seed("train", VALIDATION_SEED_BASE - 1) < scene_seed("validation", 0)
    with pytest.raises(ValueError):
        scene_seed("train", VALIDATION_SEED_BASE)
    with pytest.raises(ValueError):
        scene_seed("test", 0)


def test_fine_tuning_batches_rendered_ahead_are_the_plain_loops_batches():
    """StereoTask.batches renders in a thread; the batches (and so every fine-tuning result) must not change."""
    from jpq_core.tasks import StereoTask

    task = StereoTask(crop=(32, 64), batch_size=2)
    ahead = list(task.batches(3, seed=4))
    plain = [task.batch(i, seed=4) for i in range(3)]
    assert len(ahead) == 3
    for a, p in zip(ahead, plain):
        assert all(torch.equal(x, y) for x, y in zip(a, p))


def test_prefetched_raises_the_makers_error_and_stops_when_left_early():
    import threading

    from jpq_core.tasks import prefetched

    def make(i):
        if i == 2:
            raise ValueError("scene 2 is broken")
        return i

    items = prefetched(make, 5)
    assert [next(items), next(items)] == [0, 1]
    with pytest.raises(ValueError, match="scene 2"):
        next(items)

    left = prefetched(lambda i: i, 1000)
    assert next(left) == 0
    left.close()  # what a `break` out of a for loop does
    for thread in threading.enumerate():
        if thread.name == "prefetch":
            thread.join(timeout=2)
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
