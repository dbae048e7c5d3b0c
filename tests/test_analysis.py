"""Criteria comparison: overlap and rank agreement with known answers, masks as compression makes them,
the pipeline's own gradient statistics, and sensitivity scans cached on disk."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from jpq_core import analysis
from jpq_core.registry import CHANNEL_CRITERIA
from jpq_core.compressed import attach
from jpq_core.criteria import Random, Taylor
from jpq_core.layers import layer_weights
from jpq_core.errors import JPQError
from jpq_core.pipeline import CompressionConfig, gradient_stats
from jpq_core.pruning import make_masks
from jpq_core.tasks import ClassificationTask


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(8, 4, 3, 3, generator=g), "b": torch.randn(10, 72, generator=g)}


def test_iou_known_answers():
    a = torch.tensor([True, True, False, False])
    assert analysis.iou(a, a) == 1.0
    assert analysis.iou(a, ~a) == 0.0
    assert analysis.iou(a, torch.tensor([True, False, True, False])) == pytest.approx(1 / 3)


def test_rank_correlation_with_itself_and_reversed():
    x = torch.randn(500)
    assert analysis.rank_correlation(x, x) == pytest.approx(1.0)
    assert analysis.rank_correlation(x, -x) == pytest.approx(-1.0)
    assert analysis.rank_correlation(x, x**3) == pytest.approx(1.0)  # monotone: same ranks
    assert np.isnan(analysis.rank_correlation(x, torch.ones(500)))


def test_a_criterion_against_itself_agrees_fully_and_against_its_negation_not_at_all():
    s = {k: v.abs() for k, v in _scores().items()}
    scores = {"magnitude": s, "same": {k: v.clone() for k, v in s.items()}, "reversed": {k: -v for k, v in s.items()}}
    masks = {name: make_masks(sc, {k: v.shape for k, v in sc.items()}, 0.7, "uniform") for name, sc in scores.items()}
    table = analysis.compare_criteria(scores, masks).set_index(["pair", "layer"])
    same = table.loc["magnitude vs same"]
    assert (same["iou"] == 1.0).all() and np.allclose(same["spearman"], 1.0)
    rev = table.loc["magnitude vs reversed"]
    assert np.allclose(rev["spearman"], -1.0)
    assert (rev["iou"] == 0.0).all()  # keeping 30% from each end: no weight in common
    assert list(same.index) == ["a", "b", "all layers"]


def test_two_random_criteria_overlap_as_the_page_says():
    """The reference the page prints: independent criteria keeping a share k overlap with IoU ~ k/(2-k)."""
    shape = {"w": torch.Size([200, 200])}
    weights = {"w": torch.zeros(shape["w"])}
    ious = []
    for sparsity in (0.5, 0.9):
        m1 = make_masks(Random(1).scores(weights), shape, sparsity, "uniform")["w"]
        m2 = make_masks(Random(2).scores(weights), shape, sparsity, "uniform")["w"]
        k = 1 - sparsity
        ious.append(analysis.iou(m1, m2))
        assert ious[-1] == pytest.approx(k / (2 - k), abs=0.01)
    assert ious[1] < ious[0]


def test_kept_masks_match_the_pipeline_threshold_and_protect_the_ends():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    scores = {k: v.abs() for k, v in layer_weights(model).items()}
    masks = analysis.kept_masks(model, scores, 0.5)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == total - round(0.5 * total)
    assert masks["0"].all() and masks["4"].all()
    assert not masks["2"].all()


def test_agreement_grid_lays_out_kernels_and_codes_who_keeps_what():
    a = torch.zeros(2, 3, 2, 2, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, 0, 0, 0] = True  # kept by a only
    b[1, 2, 1, 1] = True  # kept by b only
    a[1, 1, 0, 1] = b[1, 1, 0, 1] = True  # both
    grid = analysis.agreement_grid(a, b)
    assert grid.shape == (2, 12)
    assert grid[0, 0] == 1 and grid[1, 11] == 2 and grid[1, 4 + 1] == 3
    assert (grid == 0).sum() == 24 - 3


def test_score_distribution_counts_zeros_apart_from_the_quantiles():
    scores = {"layer": torch.arange(0, 101, dtype=torch.float32)}  # one zero, then 1..100
    row = analysis.score_distribution(scores).iloc[0]
    assert row["weights"] == 101 and row["zero_share"] == pytest.approx(1 / 101)
    assert row["median"] == pytest.approx(50.5) and row["p1"] == pytest.approx(1.99) and row["p99"] == pytest.approx(99.01)


def _digits_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()


def test_calibration_stats_are_the_ones_compress_uses(tmp_path):
    model, task = _digits_model(), ClassificationTask("digits", batch_size=16)
    calls = []
    ours = analysis.calibration_stats(model, task, progress=lambda i, n: calls.append((i, n)), cache_dir=tmp_path)
    assert calls[-1] == (CompressionConfig().calibration_batches,) * 2
    theirs = gradient_stats(attach(_digits_model(), None, None), task, CompressionConfig(), Taylor())
    assert theirs is ours  # same cache entry: the page shows what compression prunes by
    scores = analysis.criterion_scores(model, ["magnitude", "taylor"], ours)
    assert torch.equal(scores["magnitude"]["3"], model[3].weight.abs())
    assert torch.equal(scores["taylor"]["0"], ours.mean_gw_abs["0"])
    with pytest.raises(JPQError, match="needs gradient statistics"):
        analysis.criterion_scores(model, ["fisher"], None)
    with pytest.raises(JPQError, match="channels"):
        analysis.criterion_scores(model, [next(iter(CHANNEL_CRITERIA))], ours)


class _CountingTask:
    """A regression task on fixed inputs: error = mean |output - dense output|, counting evaluations."""

    name, data, primary_metric = "toy", "fixed", ("err", False)

    def __init__(self, model):
        self.x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.target = model(self.x)
        self.evaluations = 0

    def evaluate(self, net):
        self.evaluations += 1
        with torch.no_grad():
            return {"err": float((net(self.x) - self.target).abs().mean())}


def test_sensitivity_scan_is_computed_once_then_read_from_disk(tmp_path):
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).eval()
    task = _CountingTask(model)
    grid = (0.0, 0.5, 0.9)
    assert analysis.read_sensitivity(model, task, "magnitude", grid, cache_dir=tmp_path) is None
    first = analysis.sensitivity_curves(model, task, "magnitude", None, grid, cache_dir=tmp_path)
    assert not first["cached"] and task.evaluations == 1 + 2 * 2  # dense + (layers x non-zero sparsities)
    assert first["metric"] == "err" and set(first["layers"]) == {"0", "2"}
    for losses in first["layers"].values():
        assert losses[0] == 0.0 and losses[2] > 0.0
    again = analysis.sensitivity_curves(model, task, "magnitude", None, grid, cache_dir=tmp_path)
    assert again["cached"] and task.evaluations == 5 and again["layers"] == first["layers"]
    assert analysis.read_sensitivity(model, task, "random", grid, cache_dir=tmp_path) is None  # another criterion
    frame = analysis.sensitivity_frame(first)
    assert len(frame) == 6 and set(frame.columns) == {"layer", "sparsity", "loss"}
    assert not hasattr(model[0], "parametrizations")  # the caller's network is left untouched


def test_a_quick_scan_uses_fewer_test_images_and_is_never_served_as_a_full_one(tmp_path):
    model, task = _digits_model(), ClassificationTask("digits")
    quick = analysis.QuickEvaluation(task)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    scan = analysis.sensitivity_curves(model, quick, "magnitude", None, (0.0, 0.9), cache_dir=tmp_path)
    assert scan["metric"] == "top1" and set(seen) == {analysis.QUICK_IMAGES} and len(seen) == 3
    assert analysis.read_sensitivity(model, quick, "magnitude", (0.0, 0.9), cache_dir=tmp_path) is not None
    assert analysis.read_sensitivity(model, task, "magnitude", (0.0, 0.9), cache_dir=tmp_path) is None
