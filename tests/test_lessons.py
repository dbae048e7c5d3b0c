"""The Learn page's computations, with answers worked out by hand or from theory."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from jpq_core import lessons
from jpq_core.costs import layer_geometry
from jpq_core.criteria import gather_gradient_stats
from jpq_core.errors import JPQError
from jpq_core.quantization import quantize_weight
from jpq_core.sweeps import pareto_mask


def test_a_grid_without_zero_point_revives_pruned_weights_ours_does_not():
    x = torch.tensor([-0.3, 0.0, 0.0, 1.0])
    # lo = -0.3, s = 1.3 / 3; 0 -> lo + s * round(0.3 / s) = -0.3 + 1.3 / 3
    assert lessons.zero_without_zero_point(x, 2) == pytest.approx(-0.3 + 1.3 / 3)
    naive = lessons.grid_without_zero_point(x, 2)
    assert naive[1].item() == pytest.approx(-0.3 + 1.3 / 3)
    for bits in (3, 4, 8):
        assert (quantize_weight(x, bits, symmetric=False, per_channel=False)[1:3] == 0).all()


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def test_zero_point_lesson_counts_what_the_naive_grid_costs():
    model = _conv_model()
    images, labels = _data()
    geometry = layer_geometry(model, (images[:1],))
    z = lessons.zero_point_lesson(model, 0.5, 4, images, labels, geometry)
    exact, naive = z["exact zero"], z["no zero point"]
    assert exact["nonzero"] <= 1 - z["pruned_share"] + 1e-9  # pruned weights stay pruned (rounding may add zeros)
    assert naive["nonzero"] > exact["nonzero"] and naive["memory_bits"] > exact["memory_bits"] and naive["macs"] > exact["macs"]
    assert z["zero_value"]["2"] != 0.0
    assert torch.equal(model[0].weight, _conv_model()[0].weight)  # the shared network is untouched
    with pytest.raises(JPQError, match="3 to 8 bits"):
        lessons.zero_point_lesson(model, 0.5, 2, images, labels, geometry)


def test_more_bits_less_rounding_error_about_six_db_per_bit():
    w = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 0.05
    results = {b: lessons.quantization_lesson(w, b) for b in (1, 2, 3, 4, 5, 6, 7, 8)}
    rmse = [results[b]["rmse"] for b in sorted(results)]
    assert all(a > b for a, b in zip(rmse, rmse[1:]))
    gain_per_bit = (results[8]["sqnr_db"] - results[4]["sqnr_db"]) / 4
    assert gain_per_bit == pytest.approx(6.02, abs=0.3)
    assert len(results[4]["levels"]) == 15 and 0.0 in results[4]["levels"]
    assert sorted(results[2]["levels"].tolist())[1] == 0.0 and len(results[1]["levels"]) == 2
    # every quantized value is one of the grid's levels
    assert np.isin(np.round(results[4]["quantized"], 6), np.round(results[4]["levels"], 6)).all()


def test_rounding_kills_the_gradient_and_the_straight_through_estimator_trains():
    df = lessons.ste_lesson(target=0.75, step=0.25, lr=0.3, steps=40, start=-1.0)
    true, ste = df[df["method"] == "true gradient"], df[df["method"] == "straight-through"]
    assert (true["gradient"] == 0).all() and (true["w"] == -1.0).all()
    assert ste["q"].iloc[-1] == pytest.approx(0.75) and ste["loss"].iloc[-1] == pytest.approx(0.0, abs=1e-12)
    between = lessons.ste_lesson(target=0.6, step=0.25, lr=0.3, steps=40, start=-1.0)
    last = between[between["method"] == "straight-through"]["q"].iloc[-10:]
    assert set(np.round(last, 6)) <= {0.5, 0.75}  # hops between the two nearest levels
    with pytest.raises(JPQError):
        lessons.ste_lesson(0.5, 0.0)


def test_bops_multiply_exactly_memory_pays_for_indices():
    model = _conv_model()
    geometry = layer_geometry(model, (torch.zeros(1, 3, 8, 8),))
    table = lessons.memory_lesson(model, "2", geometry, (0.0, 0.5, 0.9), (1, 4, None))
    for row in table.itertuples():
        assert row.bops_ratio == pytest.approx((1 - row.sparsity) * row.wbits / 32 * 8 / 32, rel=0.02)
        assert row.memory_ratio >= row.ideal_ratio
    one_bit = table[table["wbits"] == 1].set_index("sparsity")["memory_ratio"]
    assert one_bit[0.5] == pytest.approx(one_bit[0.0])  # a bitmask costs what 1-bit weights save
    assert table[(table["wbits"] == 4) & (table["sparsity"] == 0.9)]["encoding"].item() != "dense"
    with pytest.raises(JPQError, match="no layer"):
        lessons.memory_lesson(model, "nope", geometry, (0.5,), (4,))


def test_pruning_one_layer_by_each_criterion_measures_the_loss_on_a_copy():
    model = _conv_model()
    images, labels = _data()
    stats = gather_gradient_stats(model, [(images, labels)], lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    before = model[2].weight.clone()
    result = lessons.prune_layer_lesson(model, stats, "2", 0.75, images, labels)
    for name in ("magnitude", "taylor"):
        assert result[name]["mask"].mean() == pytest.approx(0.25, abs=1 / 576)
        assert result[name]["loss"] != result["dense"]["loss"]
    kept_by_magnitude = result["scores"]["magnitude"][result["magnitude"]["mask"]]
    assert kept_by_magnitude.min() >= np.sort(result["scores"]["magnitude"])[-kept_by_magnitude.size]
    assert torch.equal(model[2].weight, before)


def test_dominators_agree_with_the_front():
    memory = [0.1, 0.2, 0.3, 0.2]
    top1 = [0.5, 0.9, 0.8, 0.7]  # point 2 is beaten by 1; point 3 by 1 too
    front = pareto_mask(memory, top1, True, False)
    assert front == [True, True, False, False]
    for i in range(4):
        beaten = lessons.dominators(memory, top1, i, True, False)
        assert (not beaten) == front[i]
    assert lessons.dominators(memory, top1, 2, True, False) == [1]


def test_layer_output_errors_are_zero_for_the_same_network_and_grow_with_damage():
    model = _conv_model()
    images, _ = _data()
    assert all(e == 0 for e in lessons.layer_output_errors(model, model, images).values())
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        damaged[0].weight.mul_(1.5)
        damaged[0].bias.mul_(1.5)
    errors = lessons.layer_output_errors(model, damaged, images)
    assert errors["0"] == pytest.approx(0.5, rel=1e-6)  # the first layer's output is scaled by 1.5
    assert all(e > 0 for e in errors.values())
