"""Quantizer properties: bounded error, exact zeros, idempotence, bit width respected."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jpq_core.errors import JPQError
from jpq_core.quantization import ActivationQuantizer, learned_step_quantize, quantize_weight, step_bound, ste, uniform_params

tensor_st = st.tuples(st.integers(1, 6), st.integers(1, 20), st.integers(0, 10_000), st.floats(1e-3, 1e3), st.floats(0.0, 0.95))


def _weight(out_ch, n, seed, scale, sparsity):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_ch, n, generator=g) * scale
    w[torch.rand(out_ch, n, generator=g) < sparsity] = 0.0
    return w


@settings(max_examples=80, deadline=None)
@given(tensor_st, st.sampled_from([3, 4, 5, 6, 8, 16]), st.booleans(), st.booleans())
def test_uniform_weight_quantizer_properties(t, bits, symmetric, per_channel):
    w = _weight(*t)
    q = quantize_weight(w, bits, symmetric, per_channel)
    scale, zero, qmin, qmax = uniform_params(w, bits, symmetric, per_channel)
    assert torch.all(q[w == 0] == 0)  # pruned stays pruned
    # within half a step, give or take float32's rounding of |w| (a few 1e-6 of a step at 16 bits)
    assert torch.all((q - w).abs() <= scale / 2 * (1 + 1e-5) + 4 * torch.finfo(torch.float32).eps * w.abs().max() + 1e-12)
    torch.testing.assert_close(quantize_weight(q, bits, symmetric, per_channel), q)  # idempotent
    rows = q if per_channel else q.flatten()[None]
    for row in rows:
        assert torch.unique(row).numel() <= 2**bits  # bit width respected


@settings(max_examples=40, deadline=None)
@given(tensor_st, st.booleans())
def test_ternary_and_binary_levels(t, per_channel):
    w = _weight(*t)
    for bits, max_levels in ((2, 3), (1, 3)):  # binary keeps pruned zeros: {-a, 0, +a}
        q = quantize_weight(w, bits, per_channel=per_channel)
        assert torch.all(q[w == 0] == 0)
        rows = q if per_channel else q.flatten()[None]
        for row in rows:
            levels = torch.unique(row)
            assert levels.numel() <= max_levels
            nonzero = levels[levels != 0].abs()
            assert nonzero.numel() == 0 or torch.allclose(nonzero, nonzero[0].expand_as(nonzero))
    binary = quantize_weight(w, 1, per_channel=per_channel)
    assert torch.all((binary != 0) == (w != 0))  # every kept weight is +-a


@settings(max_examples=60, deadline=None)
@given(tensor_st, st.sampled_from([3, 4, 8]), st.booleans(), st.floats(0.2, 1.5))
def test_learned_step_grid_is_recoverable_from_the_weights(t, bits, per_channel, shrink):
    """A learned step (LSQ) clips instead of widening the grid: the de-quantized weights then re-quantize to
    themselves with the min/max quantizer, which is how the engine and a reloaded file find the step."""
    w = _weight(*t)
    bound = step_bound(w, bits, per_channel)
    step = bound * shrink  # a step the training could have reached, above the bound too
    q = learned_step_quantize(w, step, bits, per_channel)
    s = torch.minimum(step, bound)
    qmax = 2 ** (bits - 1) - 1
    assert torch.all(q[w == 0] == 0)
    levels = q / s
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # on the grid of s
    assert torch.all(levels.abs() <= qmax + 1e-4)
    torch.testing.assert_close(quantize_weight(q, bits, True, per_channel), q)
    if shrink >= 1:  # at the bound: exactly min/max quantization
        torch.testing.assert_close(q, quantize_weight(w, bits, True, per_channel))


def test_learned_step_gets_a_gradient_that_trades_clipping_for_rounding():
    """Outliers far above the bulk: shrinking the step (clipping the outliers) lowers the squared error, so
    the step's gradient must point down; the weights' gradient is straight through inside the range, zero
    where clipped."""
    w = torch.cat([torch.linspace(-1, 1, 200), torch.tensor([20.0, -20.0])])[None].requires_grad_()
    step = step_bound(w.detach(), 4, per_channel=True).clone().requires_grad_()
    ((learned_step_quantize(w, step, 4, True) - w) ** 2).sum().backward()
    assert step.grad.item() > 0  # a descent step makes it smaller
    shrunk = step.detach() * 0.2
    w.grad = None
    learned_step_quantize(w, shrunk, 4, True).sum().backward()
    assert torch.all(w.grad[0, :200] == 1) and torch.all(w.grad[0, 200:] == 0)
    assert ((learned_step_quantize(w, shrunk, 4, True) - w)[0, :200] ** 2).sum() < \
        ((learned_step_quantize(w, step, 4, True) - w)[0, :200] ** 2).sum()


def test_float_passes_through_and_bad_bits_are_refused():
    w = torch.randn(3, 3)
    assert quantize_weight(w, None) is w
    for bad in (0, 9, 32.5, 64):
        with pytest.raises(JPQError, match="weight bits must be one of"):
            quantize_weight(w, bad)
    with pytest.raises(JPQError, match="activation bits"):
        ActivationQuantizer(3)


def test_straight_through_estimator_passes_gradient_unchanged():
    x = torch.randn(5, requires_grad=True)
    y = ste(x, torch.round(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5)) and torch.equal(y, torch.round(x))


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_activation_quantizer_calibrates_and_bounds_error(method):
    torch.manual_seed(0)
    aq = ActivationQuantizer(8, method)
    data = torch.relu(torch.randn(4, 3, 16, 16))
    aq(data)  # calibration pass returns the input untouched
    aq.finish_calibration()
    assert aq.lo.item() == 0.0 and 0 < aq.hi.item() <= data.max().item() + 1e-6
    out = aq(data)
    inside = data <= aq.hi
    step = (aq.hi - aq.lo) / 255
    assert torch.all((out - data)[inside].abs() <= step / 2 + 1e-6)
    assert torch.unique(out).numel() <= 256
    assert torch.all(out[data == 0] == 0)  # ReLU zeros stay exact


def test_activation_calibration_without_data_is_a_clear_error():
    with pytest.raises(JPQError, match="saw no data"):
        ActivationQuantizer(8).finish_calibration()


@pytest.mark.parametrize("n", [1, 2, 7, 100, 10_001, 1_000_000])
def test_tail_quantiles_equal_torch_quantile(n):
    from jpq_core.quantization import tail_quantiles

    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) ** 3  # heavy tails, like activations
    expected = torch.quantile(x, torch.tensor([1e-4, 1 - 1e-4]))
    assert (torch.stack(tail_quantiles(x, 1e-4)) == expected).all()
