"""Criteria on small networks where the answer is known."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jpq_core.criteria import SNIP, Fisher, GradientMagnitude, Magnitude, Random, Taylor, gather_gradient_stats
from jpq_core.errors import JPQError
from jpq_core.layers import layer_weights
from jpq_core.registry import get_criterion


def _linear_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    x = torch.randn(32, 4)
    x[:, 2] = 0.0  # input 2 is always zero: weights reading it cannot change the loss
    y = torch.randn(32, 3)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])
    return model, batches, loss


def test_weight_that_cannot_change_the_loss_scores_zero():
    model, batches, loss = _linear_problem()
    stats = gather_gradient_stats(model, batches, loss)
    weights = layer_weights(model)
    for crit in (Taylor("abs"), Taylor("square"), Fisher(), SNIP(), GradientMagnitude()):
        s = crit.scores(weights, stats)["0"]
        assert torch.all(s[:, 2] == 0), crit.name
        assert torch.all(s[:, [0, 1, 3]] > 0), crit.name


def test_gradient_stats_match_a_hand_computed_gradient():
    model, batches, loss = _linear_problem()
    stats = gather_gradient_stats(model, batches, loss)
    w = model[0].weight.detach()
    grads = []
    for x, y in batches:  # d/dW mean((Wx - y)^2) = 2/(N*3) (Wx - y)^T x
        grads.append(2.0 / (x.shape[0] * 3) * (x @ w.T - y).T @ x)
    g = torch.stack(grads)
    torch.testing.assert_close(stats.mean_gw_abs["0"], (g * w).abs().mean(0))
    torch.testing.assert_close(stats.mean_g_sq["0"], (g**2).mean(0))
    assert model[0].weight.grad is None  # nothing left behind


def test_magnitude_orders_by_absolute_value():
    w = {"a": torch.tensor([[-3.0, 1.0], [0.5, -2.0]])}
    assert Magnitude().scores(w)["a"].tolist() == [[3.0, 1.0], [0.5, 2.0]]


def test_random_differs_by_seed_and_repeats_with_it():
    w = {"a": torch.zeros(10, 10)}
    a, b, c = Random(1).scores(w)["a"], Random(1).scores(w)["a"], Random(2).scores(w)["a"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_taylor_normalisation_and_snip_sum():
    model, batches, loss = _linear_problem()
    stats = gather_gradient_stats(model, batches, loss)
    weights = layer_weights(model)
    assert Taylor("abs", normalise=True).scores(weights, stats)["0"].norm().item() == pytest.approx(1.0)
    assert SNIP().scores(weights, stats)["0"].sum().item() == pytest.approx(1.0)


def test_criteria_by_name():
    assert get_criterion("taylor-square-norm").name == "taylor-square-norm"
    assert get_criterion("group-fisher").level == "channel" and get_criterion("fisher").level == "weight"
    with pytest.raises(JPQError, match="unknown criterion"):
        get_criterion("oracle")
