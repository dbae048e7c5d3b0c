"""Allocation from a sensitivity scan, on curves made up by hand."""

import pytest

from jpq_core.errors import JPQError
from jpq_core.sensitivity import allocate

SCAN = {"sparsities": [0.0, 0.5, 0.9], "layers": {"robust": [0.0, 0.0, 0.01], "fragile": [0.0, 0.2, 0.6]}}


def test_total_sparsity_meets_the_target_and_robust_layers_take_more():
    sizes = {"robust": 1000, "fragile": 1000}
    alloc = allocate(SCAN, sizes, 0.6)
    total = sum(alloc[k] * sizes[k] for k in sizes) / 2000
    assert total == pytest.approx(0.6, abs=1e-6)
    assert alloc["robust"] > alloc["fragile"]


def test_protected_layers_are_left_out_and_unreachable_targets_refused():
    sizes = {"robust": 1000, "fragile": 1000}
    alloc = allocate(SCAN, sizes, 0.4, protect={"fragile"})
    assert set(alloc) == {"robust"} and alloc["robust"] == pytest.approx(0.8)
    with pytest.raises(JPQError, match="beyond what the scan covers"):
        allocate(SCAN, sizes, 0.95)
