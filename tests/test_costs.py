"""The cost model against a small layer computed by hand."""

import pytest
import torch
import torch.nn as nn

from jpq_core.costs import csr_bits, layer_geometry, network_cost


def _layer_and_mask():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False))
    mask = torch.zeros(3, 2, 3, 3, dtype=torch.bool)
    mask.view(-1)[:6] = True  # 6 of 54 weights kept, adjacent
    return model, {"0": mask}


def test_small_conv_by_hand():
    model, masks = _layer_and_mask()
    geometry = layer_geometry(model, (torch.zeros(1, 2, 4, 4),))
    assert geometry == {"0": (16, 32)}  # 4x4 output positions, 2x4x4 input elements
    cost = network_cost(model, masks, 4, 8, geometry)
    layer = cost["layers"][0]
    # dense 54*4 = 216, bitmask 54 + 6*4 = 78, CSR with 2-bit gaps (all gaps are 1) 6*(4+2) = 36 -> csr2;
    # + 3 per-channel scales * 32
    assert layer["encoding"] == "csr2" and layer["weight_bits"] == 36 + 96
    assert cost["dense_weight_bits"] == 54 * 32
    assert cost["memory_ratio"] == pytest.approx((36 + 96) / (54 * 32))
    assert cost["macs"] == 6 * 16 and cost["dense_macs"] == 54 * 16
    assert cost["bops"] == 6 * 16 * 4 * 8 and cost["dense_bops"] == 54 * 16 * 32 * 32
    assert cost["bops_ratio"] == pytest.approx((6 * 4 * 8) / (54 * 32 * 32))
    # energy: MACs * (0.2 pJ * 4*8/64 + 0.1 pJ) + 36 bits * 20 pJ/bit (DRAM) + 32 inputs * 8 bits * 10/64 pJ/bit
    assert cost["energy_pj"] == pytest.approx(96 * (0.2 * 32 / 64 + 0.1) + 36 * 20 + 32 * 8 * 10 / 64)
    assert cost["hardware_cost"] == pytest.approx(96 * 282 * 32 / 64 * 1e-6)
    assert cost["sparsity"] == pytest.approx(48 / 54)
    assert "estimate" in cost["assumptions"]["energy"]


def test_dense_float_network_has_ratio_one():
    model, _ = _layer_and_mask()
    geometry = layer_geometry(model, (torch.zeros(1, 2, 4, 4),))
    cost = network_cost(model, None, None, None, geometry)
    for key in ("memory_ratio", "bops_ratio", "energy_ratio", "hardware_cost_ratio", "macs_ratio"):
        assert cost[key] == pytest.approx(1.0)


def test_csr_inserts_fillers_for_long_gaps():
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[0, 40]] = True  # gap of 40 needs (40 - 1) // 16 = 2 fillers
    assert csr_bits(mask, 4) == (2 + 2) * (4 + 4)
    assert csr_bits(torch.zeros(5, dtype=torch.bool), 4) == 0
    assert csr_bits(mask, 4, index_bits=6) == 2 * (4 + 6)  # 6-bit gaps reach 64: no filler


def test_the_index_width_is_the_cheapest_for_each_layer():
    """Denser layers take narrow gap fields, very sparse ones wide fields (Deep Compression's 5 and 8 bits)."""
    model = nn.Sequential(nn.Conv2d(40, 40, 5, bias=False))
    geometry = {"0": (1, 1)}
    sparse = torch.zeros(40, 40, 5, 5, dtype=torch.bool)
    sparse.view(-1)[::100] = True  # every gap is 100: fillers at 6 bits and below, none at 7
    layer = network_cost(model, {"0": sparse}, 4, 8, geometry)["layers"][0]
    assert layer["encoding"] == "csr7"
    assert layer["weight_bits"] == csr_bits(sparse, 4, 7) + 40 * 32 < csr_bits(sparse, 4, 4) + 40 * 32


def test_shared_layers_count_every_use():
    conv = nn.Conv2d(1, 1, 3, padding=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, a, b):
            return self.conv(a) + self.conv(b)

    geometry = layer_geometry(Twice(), (torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5)))
    assert geometry["conv"] == (50, 50)
