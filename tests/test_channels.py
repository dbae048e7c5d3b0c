"""Coupled-channel (structured) pruning: groups, group criteria, masks and physical pruning."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jpq_core.channels import (BNScale, GroupFisher, GroupL1, GroupL2, GroupTaylor, channel_groups, channel_masks,
                               freed_parameters, gather_group_stats, physically_prune)
from jpq_core.layers import prunable_layers
from jpq_core.errors import JPQError
from jpq_core.models import build_network
from jpq_core.pruning import apply_masks, sparsity_of

R20_INPUTS = (torch.zeros(1, 3, 32, 32),)
STEREO_INPUTS = (torch.zeros(1, 3, 64, 128), torch.zeros(1, 3, 64, 128))


def _randomise_batch_norms(model, seed=0):
    """Non-trivial running statistics and affine parameters, so a removed channel's BN output is a non-zero
    constant that the consuming layers must stop reading."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is fastest, and on busy cores several threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    model = _randomise_batch_norms(build_network("resnet20").eval())
    return model, channel_groups(model, R20_INPUTS)


def _group_of(groups, layer):
    return next(g for g in groups if layer in g.layers("out"))


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_residual_add_couples_the_stem_with_every_stage1_block_output(resnet20):
    model, groups = resnet20
    g = _group_of(groups, "stem.0")
    assert set(g.layers("out")) == {"stem.0", "stage1.0.conv2", "stage1.1.conv2", "stage1.2.conv2"}
    assert set(g.layers("in")) == {"stage1.0.conv1", "stage1.1.conv1", "stage1.2.conv1", "stage2.0.conv1", "stage2.0.downsample.0"}
    assert {"stem.1", "stage1.0.bn2", "stage1.1.bn2", "stage1.2.bn2"} <= set(g.layers("bn"))
    # each layer's output channels are in exactly one group; the classifier's outputs in none
    outs = [layer for grp in groups for layer in grp.layers("out")]
    assert len(outs) == len(set(outs)) and "fc" not in outs
    assert "fc" in _group_of(groups, "stage3.2.conv2").layers("in")

    pruned = physically_prune(model, R20_INPUTS, {"stem.0": [3]})
    assert pruned.stem[0].out_channels == 15 and pruned.stem[1].num_features == 15
    for block in pruned.stage1:
        assert block.conv2.out_channels == 15 and block.bn2.num_features == 15 and block.conv1.in_channels == 15
        assert block.conv1.out_channels == 16  # a different group: untouched
    assert pruned.stage2[0].conv1.in_channels == 15 and pruned.stage2[0].downsample[0].in_channels == 15
    assert model.stem[0].out_channels == 16  # the original is not changed
    # removing channel 3 of the stem's group keeps the other channels' weights in order
    torch.testing.assert_close(pruned.stage1[0].conv2.weight, model.stage1[0].conv2.weight[[i for i in range(16) if i != 3]])


@pytest.mark.parametrize("criterion", [GroupL1(), GroupL2()], ids=str)
def test_masked_resnet20_computes_what_the_physically_pruned_one_computes(resnet20, criterion):
    model, groups = resnet20
    masks = channel_masks(model, groups, criterion.group_scores(model, groups), 0.6)
    masked = apply_masks(copy.deepcopy(model), masks)
    pruned = physically_prune(model, R20_INPUTS, masks)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, got = masked(x), pruned(x)
    assert got.shape == (4, 10)
    assert (expected - got).abs().max() < 1e-4
    kept = sum(int(m.sum()) for m in masks.values())
    assert sum(m.weight.numel() for m in prunable_layers(pruned).values()) == kept  # exactly the kept weights
    assert _params(pruned) < 0.5 * _params(model)


def test_stereo_groups_leave_cost_volume_disparity_and_outputs_alone():
    torch.manual_seed(0)
    model = _randomise_batch_norms(build_network("stereo").eval())
    groups = channel_groups(model, STEREO_INPUTS)
    outs = {layer for g in groups for layer in g.layers("out")}
    # outputs: disparity shifts, the refinement residual; matching features (read by the weight-free correlation)
    assert not outs & {"aggregation.5", "refine.4", "features.quarter_res.3"}
    # the shared extractor's residual blocks are one group, the 1/2-res features feed refine's first 24 inputs,
    # the context feeds aggregation inputs 24..39 (after the 24 cost-volume channels, which no group touches)
    assert {"features.quarter_res.0.0", "features.quarter_res.1.body.1", "features.quarter_res.2.body.1"} == set(
        _group_of(groups, "features.quarter_res.0.0").layers("out"))
    agg_in = [m for g in groups for m in g.members if m.layer == "aggregation.0.0" and m.kind == "in"]
    assert len(agg_in) == 1 and sorted(agg_in[0].index.tolist()) == list(range(24, 40))
    refine_in = [m for g in groups for m in g.members if m.layer == "refine.0.0" and m.kind == "in"]
    assert len(refine_in) == 1 and sorted(refine_in[0].index.tolist()) == list(range(24))

    masks = channel_masks(model, groups, GroupL1().group_scores(model, groups), 0.5)
    masked = apply_masks(copy.deepcopy(model), masks)
    pruned = physically_prune(model, STEREO_INPUTS, masks)
    left, right = torch.rand(2, 3, 60, 124), torch.rand(2, 3, 60, 124)  # not a multiple of 8: padded inside
    with torch.no_grad():
        expected, got = masked(left, right), pruned(left, right)
    assert got.shape == (2, 60, 124)
    assert (expected - got).abs().max() < 1e-4
    assert _params(pruned) < 0.65 * _params(model)
    assert pruned.aggregation[5].out_channels == model.shifts and pruned.refine[4].out_channels == 1


def test_bn_scale_prunes_a_channel_with_zero_gamma_first(resnet20):
    model, groups = resnet20
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.stage2[1].bn1.weight[7] = 0.0
    scores = BNScale().group_scores(model, groups)
    start = 0
    for g in groups:
        if g.root == "stage2.1.conv1":
            break
        start += g.size
    assert int(torch.argmin(scores)) == start + 7 and (scores > 0).sum() == len(scores) - 1
    masks = channel_masks(model, groups, scores, 1e-4)  # one channel's worth
    assert not masks["stage2.1.conv1"][7].any() and not masks["stage2.1.conv2"][:, 7].any()
    assert sum(int((~m).sum()) for m in masks.values()) == 2 * 32 * 9  # nothing else removed


def _classification_batches():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    return [(x[:8], y[:8]), (x[8:], y[8:])], lambda m, b: F.cross_entropy(m(b[0]), b[1])


def test_group_fisher_is_zero_for_a_channel_that_cannot_change_the_loss(resnet20):
    model, groups = resnet20
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.stage1[0].conv2.weight[:, 5] = 0.0  # nothing reads channel 5 of stage1.0.conv1 any more
    batches, loss = _classification_batches()
    stats = gather_group_stats(model, groups, batches, loss)
    i = [g.root for g in groups].index("stage1.0.conv1")
    for crit in (GroupFisher(), GroupTaylor()):
        s = crit.group_scores(model, groups, stats)
        start = sum(g.size for g in groups[:i])
        group = s[start : start + 16]
        assert group[5] == 0, crit.name
        assert (group[[c for c in range(16) if c != 5]] > 0).all(), crit.name

    # s_nc = sum_hw a dL/da on bn1's output, computed independently with a tensor hook
    captured = {}

    def keep(module, inputs, out):
        out.register_hook(lambda grad: captured.setdefault("grads", []).append(grad))
        captured.setdefault("acts", []).append(out.detach().clone())

    h = model.stage1[0].bn1.register_forward_hook(keep)
    for b in batches:
        model.zero_grad()
        loss(model, b).backward()
    h.remove()
    model.zero_grad(set_to_none=True)
    s_nc = torch.cat([(a * g).sum((2, 3)) for a, g in zip(captured["acts"], captured["grads"])])
    torch.testing.assert_close(stats.fisher[i], (s_nc**2).sum(0))
    expected = (s_nc**2).sum(0) / freed_parameters(model, groups[i])
    torch.testing.assert_close(GroupFisher().group_scores(model, groups, stats)[start : start + 16], expected)
    assert freed_parameters(model, groups[i])[0] == 2 * 16 * 9  # a row of conv1 and a column of conv2


def test_gradient_criteria_without_statistics_raise(resnet20):
    model, groups = resnet20
    with pytest.raises(JPQError, match="gather_group_stats"):
        GroupFisher().group_scores(model, groups, None)


@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_requested_sparsity_is_reached_within_one_channel(resnet20, sparsity):
    model, groups = resnet20
    masks = channel_masks(model, groups, GroupL1().group_scores(model, groups), sparsity)
    total = sum(m.weight.numel() for m in prunable_layers(model).values())
    largest_channel = max(float(freed_parameters(model, g).max()) for g in groups)
    assert sparsity <= sparsity_of(masks) <= sparsity + largest_channel / total


@pytest.mark.parametrize("min_channels", [1, 3])
def test_every_group_keeps_min_channels(resnet20, min_channels):
    model, groups = resnet20
    # stage3.1.conv1's channels score lowest of all: the whole group would go, but min_channels stay
    scores = [torch.rand(g.size, generator=torch.Generator().manual_seed(i)) + (0 if g.root == "stage3.1.conv1" else 10)
              for i, g in enumerate(groups)]
    masks = channel_masks(model, groups, scores, 0.5, min_channels=min_channels)
    assert sparsity_of(masks) >= 0.5
    alive = {g.root: int(masks[g.root].flatten(1).any(1).sum()) for g in groups}
    assert alive["stage3.1.conv1"] == min_channels and min(alive.values()) >= min_channels
    kept = torch.nonzero(masks["stage3.1.conv1"].flatten(1).any(1)).flatten()
    assert set(kept.tolist()) == set(torch.argsort(scores[groups.index(_group_of(groups, "stage3.1.conv1"))])[-min_channels:].tolist())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (apply_masks(copy.deepcopy(model), masks)(x) - physically_prune(model, R20_INPUTS, masks)(x)).abs().max() < 1e-4


def test_sparsity_0_99_keeps_one_channel_per_group(resnet20):
    model, groups = resnet20
    masks = channel_masks(model, groups, GroupL2().group_scores(model, groups), 0.99)
    assert sparsity_of(masks) >= 0.99
    assert all(masks[g.root].flatten(1).any(1).sum() >= 1 for g in groups)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_bad_sparsity_raises(resnet20, sparsity):
    model, groups = resnet20
    with pytest.raises(JPQError, match="sparsity"):
        channel_masks(model, groups, GroupL1().group_scores(model, groups), sparsity)


def test_unreachable_sparsity_and_bad_arguments_raise(resnet20):
    model, groups = resnet20
    scores = GroupL1().group_scores(model, groups)
    with pytest.raises(JPQError, match="cannot be reached"):
        channel_masks(model, groups, scores, 0.9999)  # the stem's RGB inputs and the classifier stay
    with pytest.raises(JPQError, match="cannot be reached"):
        channel_masks(model, groups, scores, 0.99, min_channels=8)
    with pytest.raises(JPQError, match="min_channels"):
        channel_masks(model, groups, scores, 0.5, min_channels=0)
    with pytest.raises(JPQError, match="scores"):
        channel_masks(model, groups, scores[:-1], 0.5)
    with pytest.raises(JPQError, match="example inputs"):
        channel_groups(model, STEREO_INPUTS)  # resnet20 takes one input
    with pytest.raises(JPQError, match="no prunable output channels"):
        physically_prune(model, R20_INPUTS, {"fc": [0]})
