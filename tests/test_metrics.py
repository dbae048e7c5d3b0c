"""Metric code against values computed by hand."""

import numpy as np
import pytest

from jpq_core.metrics import confusion_matrix, stereo_metrics, top1


def test_stereo_metrics_by_hand():
    gt = np.array([[10.0, 20.0, np.inf], [30.0, 40.0, 50.0]])
    pred = np.array([[10.5, 23.5, 99.0], [np.nan, 41.0, 50.0]])
    m = stereo_metrics(pred, gt)
    # Valid: 5 pixels. Errors on predicted ones: 0.5, 3.5, 1.0, 0.0; the NaN one is missing.
    assert m["valid_pixels"] == 5
    assert m["coverage"] == pytest.approx(4 / 5)
    assert m["epe"] == pytest.approx((0.5 + 3.5 + 1.0 + 0.0) / 4)
    assert m["bad3"] == pytest.approx(2 / 5)  # 3.5 px error and the missing pixel
    assert m["bad2"] == pytest.approx(2 / 5)
    assert m["bad1"] == pytest.approx(2 / 5)  # 1.0 is not > 1


def test_negative_predictions_count_as_missing():
    gt = np.full((2, 2), 5.0)
    pred = np.array([[5.0, -1.0], [5.0, 5.0]])
    assert stereo_metrics(pred, gt)["bad3"] == pytest.approx(0.25)


def test_shape_mismatch_and_empty_ground_truth_raise():
    with pytest.raises(ValueError):
        stereo_metrics(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        stereo_metrics(np.zeros((2, 2)), np.full((2, 2), np.inf))


def test_top1_and_confusion():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    labels = np.array([1, 1, 1])
    assert top1(logits, labels) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(confusion_matrix(logits.argmax(1), labels, 2), [[0, 0], [1, 2]])
