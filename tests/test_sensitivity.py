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


def test_output_error_allocation_meets_the_target_and_weighs_layer_sizes():
    """Two layers with the same error curve: the large one gives up more weights (each of its weights costs
    less error); a flat curve is pruned as far as the grid goes before a steep one is touched."""
    from jpq_core.sensitivity import allocate_by_output_error

    grid = [0.0, 0.5, 0.7, 0.9, 0.95]
    same = [1.0, 1.1, 1.3, 2.0, 3.0]
    scan = {"sparsities": grid, "layers": {"big": same, "small": same, "flat": [1.0] * 5}}
    sizes = {"big": 10_000, "small": 1_000, "flat": 1_000}
    alloc = allocate_by_output_error(scan, sizes, 0.8)
    assert sum(alloc[k] * sizes[k] for k in sizes) / sum(sizes.values()) == pytest.approx(0.8, abs=1e-6)
    assert alloc["big"] > alloc["small"]
    assert alloc["flat"] >= alloc["big"]
    with pytest.raises(JPQError, match="beyond what the scan covers"):
        allocate_by_output_error(scan, sizes, 0.97)
    with pytest.raises(JPQError, match="no errors for small"):
        allocate_by_output_error({"sparsities": grid, "layers": {"big": same}}, sizes, 0.5)


@pytest.fixture(scope="module")
def resnet20_w4a8():
    from jpq_core.compression import compress_without_training
    from jpq_core.models import load_network
    from jpq_core.pipeline import CompressionConfig
    from jpq_core.tasks import make_task

    dense, task = load_network("resnet20").eval(), make_task("resnet20")
    config = CompressionConfig(network="resnet20", criterion="magnitude", sparsity=0.0, wbits=4, abits=8,
                               finetune="none").check()
    return dense, task, config, compress_without_training(dense, task, config, recovery=False)


def test_the_repaired_scan_refits_each_layer_and_leaves_the_network_as_it_was(resnet20_w4a8):
    """Each scanned layer, pruned to 90% and refit by least squares, hurts the output less than pruned alone;
    the scan puts every weight, mask and batch-norm mean back."""
    import torch

    from jpq_core.compressed import effective_weights
    from jpq_core.layers import prunable_layers
    from jpq_core.pruning import make_masks
    from jpq_core.recovery import calibration_inputs
    from jpq_core.sensitivity import repaired_scan

    dense, task, _, net = resnet20_w4a8
    names = list(prunable_layers(net))
    scanned = {"stage1.1.conv1", "stage3.0.conv2"}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weights = effective_weights(dense)
    scores = {k: w.abs() for k, w in weights.items()}
    scan = repaired_scan(net, dense, task, scores, (0.0, 0.9), samples=32, protect=set(names) - scanned)
    assert set(scan["layers"]) == scanned and scan["samples"] == 32
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    inputs = calibration_inputs(task, 32)
    with torch.no_grad():
        reference = dense(*inputs)
        for name in scanned:
            base, repaired = scan["layers"][name]
            assert base == pytest.approx(float((net(*inputs) - reference).abs().mean()), rel=1e-5)
            layer = prunable_layers(net)[name]
            mask = make_masks({name: scores[name]}, {name: layer.weight.shape}, 0.9, allocation="uniform")[name]
            kept = layer.parametrizations.weight[0].mask.clone()
            layer.parametrizations.weight[0].mask.copy_(mask)
            unrepaired = float((net(*inputs) - reference).abs().mean())
            layer.parametrizations.weight[0].mask.copy_(kept)
            assert base < repaired < unrepaired


def test_recovery_aware_allocation_is_scanned_once_then_read_from_disk(resnet20_w4a8, tmp_path, monkeypatch):
    from jpq_core import sensitivity
    from jpq_core.layers import first_and_last, prunable_layers

    dense, task, config, _ = resnet20_w4a8
    monkeypatch.setattr(sensitivity, "REPAIRED_SPARSITIES", (0.0, 0.9, 0.99))
    monkeypatch.setitem(sensitivity.SCAN_SAMPLES, "classification", 32)
    alloc = sensitivity.recovery_aware_allocation(dense, task, config, 0.9, cache_dir=tmp_path)
    sizes = {k: layer.weight.numel() for k, layer in prunable_layers(dense).items()}
    assert set(alloc) == set(sizes) - first_and_last(dense)
    assert sum(alloc[k] * sizes[k] for k in alloc) / sum(sizes.values()) == pytest.approx(0.9, abs=1e-6)
    assert len(list(tmp_path.glob("repaired-*.json"))) == 1

    def no_second_scan(*args, **kwargs):
        raise AssertionError("scanned again instead of reading the saved scan")

    monkeypatch.setattr(sensitivity, "repaired_scan", no_second_scan)
    assert sensitivity.recovery_aware_allocation(dense, task, config, 0.9, cache_dir=tmp_path) == alloc
