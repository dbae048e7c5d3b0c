"""Quantizer properties: bounded error, exact zeros, idempotence, bit width respected."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jpq_core.errors import JPQError
from jpq_core.quantization import ActivationQuantizer, quantize_weight, ste, uniform_params

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
    assert torch.all((q - w).abs() <= scale / 2 * (1 + 1e-5) + 1e-12)  # within half a step
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
