"""What the pages show, computed by the library: colour limits and error maps, the classifier summary,
network labels, the criteria offered, and the Learn page's lessons."""

from __future__ import annotations

import numpy as np
import pytest

from jpq_core.evaluation import classifier_summary
from jpq_core.errors import JPQError
from jpq_core.models import NETWORKS, network_label
from jpq_core.plots import disparity_limit, error_map
from jpq_core.registry import CHANNEL_CRITERIA, WEIGHT_CRITERIA, criterion_names, get_criterion


def test_error_map_is_blank_where_the_ground_truth_is_unknown():
    gt = np.array([[10.0, np.inf], [np.nan, 4.0]])
    disp = np.array([[12.5, 3.0], [1.0, 4.0]])
    err = error_map(disp, gt)
    assert err[0, 0] == 2.5 and err[1, 1] == 0.0
    assert np.isnan(err[0, 1]) and np.isnan(err[1, 0])


def test_colour_limit_comes_from_the_ground_truth_else_the_prediction():
    gt = np.array([[10.0, np.inf], [np.nan, 4.0]])
    assert disparity_limit(gt, np.full((2, 2), 50.0)) == pytest.approx(11.0)
    assert disparity_limit(None, np.array([[20.0, np.nan]])) == pytest.approx(22.0)
    assert disparity_limit(np.full((2, 2), np.nan), np.array([[5.0]])) == pytest.approx(5.5)


def test_classifier_summary_counts_every_class_the_network_outputs():
    logits = np.zeros((4, 12))
    logits[[0, 1, 2, 3], [11, 3, 3, 0]] = 1.0  # a 12-class network: not the digits' 10
    labels = np.array([11, 3, 5, 0])
    summary = classifier_summary(logits, labels)
    assert summary["classes"] == 12 and summary["confusion"].shape == (12, 12)
    assert summary["top1"] == pytest.approx(0.75)
    assert summary["mistakes"].tolist() == [2] and summary["confusion"][5, 3] == 1


def test_every_network_has_a_label_and_unknown_names_are_refused():
    assert network_label("resnet20") == "ResNet-20 (digits)"
    assert all(network_label(n) for n in NETWORKS)
    with pytest.raises(JPQError):
        network_label("vgg")


def test_the_criteria_offered_are_the_registry_without_aliases():
    weight, channel = criterion_names("weight"), criterion_names("channel")
    assert "taylor" in weight and "taylor-abs" not in weight and "magnitude" in weight
    assert set(weight) | {"taylor-abs"} == set(WEIGHT_CRITERIA) and set(channel) == set(CHANNEL_CRITERIA)
    assert criterion_names() == weight + channel
    assert all(get_criterion(n).level == "weight" for n in weight)
    assert all(get_criterion(n).level == "channel" for n in channel)
    with pytest.raises(JPQError):
        criterion_names("filter")


def test_lessons_are_computed_once_and_handed_out_as_copies(digits_task, resnet20, monkeypatch):
    from jpq_core import lessons

    calls = []
    real = lessons.quantization_lesson
    monkeypatch.setattr(lessons, "quantization_lesson", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr("jpq_core.analysis.calibration_stats", lambda model, task: None)  # no gradient pass here
    course = lessons.Lessons(resnet20, digits_task, held_out=16)
    assert len(course.images) == 16 and course.layers[0] in course.geometry
    first = course.quantize(course.layers[1], 4, True)
    first["changed by the caller"] = True
    again = course.quantize(course.layers[1], 4, True)
    assert calls == [1] and "changed by the caller" not in again
