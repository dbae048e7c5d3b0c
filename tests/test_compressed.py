"""The compressed layer's accessors and detach."""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from jpq_core.compressed import (activation_bits, add_activation_quantizers, attach, detach, layer_bits, layer_mask,
                                 raw_weight, transform)
from jpq_core.layers import first_and_last, prunable_layers
from jpq_core.models import build_network


def _compressed():
    net = build_network("resnet20").eval()
    masks = {k: torch.rand(l.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5
             for k, l in prunable_layers(net).items()}
    return attach(net, masks, 4), masks


def test_accessors_read_masks_bits_and_the_raw_weight():
    net, masks = _compressed()
    name, layer = next(iter(prunable_layers(net).items()))
    assert torch.equal(layer_mask(layer), masks[name]) and layer_bits(layer) == 4
    assert raw_weight(layer) is layer.parametrizations.weight.original and transform(layer) is not None
    assert activation_bits(layer) is None
    add_activation_quantizers(net, 8)
    assert activation_bits(layer) == 8
    plain = torch.nn.Conv2d(3, 4, 3)
    assert transform(plain) is None and layer_mask(plain) is None and layer_bits(plain) is None
    assert raw_weight(plain) is plain.weight
    assert len(first_and_last(net)) == 2


def test_detach_gives_a_plain_copy_that_computes_the_same_and_leaves_the_original_alone():
    net, _ = _compressed()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = net(x)
    plain = detach(net)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert set(plain.state_dict()) == set(build_network("resnet20").state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)  # the original still works
    assert all(parametrize.is_parametrized(l, "weight") for l in prunable_layers(net).values())
