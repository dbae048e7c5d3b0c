"""The live view's compression: the same path as the pipeline's, and every slider change takes effect."""

from __future__ import annotations

import pytest
import torch

from jpq_core.compression import compress_without_training
from jpq_core.errors import JPQError
from jpq_core.layers import prunable_layers
from jpq_core.live import LiveConfig, LiveNetwork
from jpq_core.pipeline import CompressionConfig, compress


def test_keeping_the_first_layer_dense_is_honoured_for_channel_criteria_when_it_changes(resnet20):
    live = LiveNetwork("resnet20", resnet20)
    first = next(iter(prunable_layers(resnet20)))

    def prunes_first(protect: bool) -> bool:  # is the first layer's output among the prunable channels?
        return any(m.layer == first and m.kind == "out" for g in live.groups(protect) for m in g.members)

    kept = LiveConfig(network="resnet20", criterion="group-l1", sparsity=0.6, wbits=None, abits=None, protect_first_last=True,
                      recovery="none")  # which channels are pruned, not their repair (seconds each)
    live.compress(kept)  # the groups are traced for the first request ...
    assert not prunes_first(True)
    assert prunes_first(False)  # ... and traced again when the setting changes, not reused
    freed = live.compress(LiveConfig(**{**kept.__dict__, "protect_first_last": False}))
    assert freed.sparsity == pytest.approx(0.6, abs=0.05)


def test_the_pipeline_without_fine_tuning_is_the_shared_path(resnet20, digits_task):
    config = CompressionConfig(network="resnet20", criterion="magnitude", sparsity=0.7, wbits=4, abits=8,
                               finetune="none", calibration_batches=2).check()
    net, _ = compress(resnet20, digits_task, config)
    again = compress_without_training(resnet20, digits_task, config)
    x = digits_task.test_x[:8]
    with torch.inference_mode():
        torch.testing.assert_close(net(x), again(x), rtol=0, atol=0)


def test_a_recovery_step_runs_on_the_quantized_network_with_its_activation_ranges_fixed(resnet20, digits_task):
    """Recovery comes last: weights quantized, activation ranges calibrated (and kept: refitting them after least
    squares measured worse), the dense network given as its reference; it may not change how many weights are kept."""
    seen = {}

    def recovery(net, task, config, dense):
        layer = next(iter(prunable_layers(net).values()))
        seen["wbits"] = layer.parametrizations.weight[0].bits
        seen["calibrated"] = hasattr(layer, "input_quantizer") and not layer.input_quantizer.calibrating
        seen["dense"] = dense is resnet20

    config = CompressionConfig(network="resnet20", criterion="magnitude", sparsity=0.5, wbits=4, abits=8,
                               finetune="none", calibration_batches=1).check()
    compress_without_training(resnet20, digits_task, config, recovery=recovery)
    assert seen == {"wbits": 4, "calibrated": True, "dense": True}

    def prunes_more(net, task, config, dense):
        layer = next(iter(prunable_layers(net).values()))
        layer.parametrizations.weight[0].mask.zero_()
    with pytest.raises(JPQError, match="how many"):
        compress_without_training(resnet20, digits_task, config, recovery=prunes_more)


def test_the_live_view_shows_the_recovered_network_when_recovery_is_chosen(resnet20):
    """ResNet-20 at 95%, w4/a8: without training the raw network guesses; the same slider position with
    recovery chosen shows a working one, with the recovery's time among the change's timings and the choice in
    the link."""
    live = LiveNetwork("resnet20", resnet20)
    chosen = LiveConfig(network="resnet20", criterion="magnitude", sparsity=0.95, wbits=4, abits=8)
    assert chosen.recovery == "auto" and chosen.recovery_method == "obc+bn"  # the default: the best measured method
    raw = live.compress(chosen.without_recovery())
    recovered = live.compress(chosen, raw=raw)
    assert recovered.evaluation.metrics["top1"] > raw.evaluation.metrics["top1"] + 0.3  # fractions: 0.10 -> 0.97 measured
    assert recovered.raw_metrics == raw.evaluation.metrics and recovered.recovery["method"] == "obc+bn"
    # recovering works on a copy: the raw result (cached and shown while recovery runs) is left as it was
    assert live.evaluate(raw.model).metrics == raw.evaluation.metrics
    assert recovered.sparsity == pytest.approx(raw.sparsity, abs=1e-6)
    assert recovered.timings["recovery"] > 0 and "recovery" not in raw.timings
    config, problems = LiveConfig.from_query(recovered.config.to_query())
    assert config == recovered.config and not problems
    _, problems = LiveConfig.from_query({"recovery": "magic"})
    assert problems and "recovery must be one of" in problems[0]


def test_auto_recovery_runs_only_where_the_network_without_it_is_worse_than_dense():
    """auto skips a network within one point of dense (recovery would cost seconds and show nothing), runs
    otherwise; a method the user chose always runs; a NaN metric counts as broken."""
    auto = LiveConfig(network="stereo", sparsity=0.9)
    dense = {"bad3": 0.138}
    assert not auto.needs_recovery({"bad3": 0.145}, dense)
    assert auto.needs_recovery({"bad3": 0.20}, dense)
    assert auto.needs_recovery({"bad3": float("nan")}, dense)
    assert LiveConfig(network="stereo", recovery="bn").needs_recovery({"bad3": 0.138}, dense)
    assert not LiveConfig(network="stereo", recovery="none").needs_recovery({"bad3": 0.9}, dense)
    classifier = LiveConfig(network="resnet20")
    assert classifier.needs_recovery({"top1": 0.5}, {"top1": 1.0}) and not classifier.needs_recovery({"top1": 0.995}, {"top1": 1.0})


def test_auto_recovery_in_the_library_leaves_a_network_close_to_dense_as_it_is(resnet20):
    """LiveNetwork.compress applies the page's rule: at 20% the raw ResNet-20 is within a point of dense, so
    auto returns it unrecovered (no recovery time spent)."""
    live = LiveNetwork("resnet20", resnet20)
    result = live.compress(LiveConfig(network="resnet20", criterion="magnitude", sparsity=0.2, wbits=8, abits=8))
    assert result.recovery is None and "recovery" not in result.timings
    assert result.config.recovery == "auto"


def test_a_torchvision_network_travels_in_a_link_and_its_random_weights_are_not_recovered():
    from dataclasses import replace

    from jpq_core.recovery import best_method

    config, problems = LiveConfig.from_query({"network": "tv:resnet18", "recovery": "auto"})
    assert problems == [] and config.network == "tv:resnet18" and config.untrained
    assert config.recovery_method == "none"  # nothing worth refitting towards
    uploaded = replace(config, checkpoint="a" * 40)
    assert not uploaded.untrained and uploaded.recovery_method == best_method("classification")
    assert not LiveConfig(network="resnet20").untrained
    _, problems = LiveConfig.from_query({"network": "tv:vit_h_14"})  # in torchvision, not offered live
    assert "unknown network 'tv:vit_h_14'; the app offers stereo" in problems[0]


def test_a_recovered_results_row_opens_recovered_the_same_way_and_others_at_the_page_default():
    from jpq_core.live import config_from_row

    row = {"network": "resnet20", "criterion": "magnitude", "sparsity": 0.9, "wbits": 4, "abits": 8,
           "config": {"recovery": "obc+bn", "allocation": "global"}}
    assert config_from_row(row)[0].recovery == "obc+bn"
    assert config_from_row({**row, "config": {"allocation": "global"}})[0].recovery == "auto"


def test_the_recovery_aware_allocation_is_offered_live_once_its_scan_is_saved(resnet20, tmp_path, monkeypatch):
    """Without a saved scan the live view refuses with the command that makes one (it takes minutes); with
    one (shipped, here made up: layers whose output error rises at different rates), the configuration
    compresses to its sparsity with per-layer sparsities from the scan."""
    import json

    from jpq_core import sensitivity
    from jpq_core.layers import first_and_last, prunable_layers

    monkeypatch.setattr(sensitivity, "SHIPPED_SCAN_DIR", tmp_path / "shipped")
    monkeypatch.setattr(sensitivity, "REPAIRED_SCAN_DIR", tmp_path / "cache")
    live = LiveNetwork("resnet20", resnet20)
    config = LiveConfig(network="resnet20", criterion="magnitude", allocation="recovery-aware", sparsity=0.9, wbits=4,
                        abits=8, recovery="none")
    with pytest.raises(JPQError, match="python -m jpq_core compress --network resnet20 --criterion magnitude"):
        live.compress(config)
    grid = list(sensitivity.REPAIRED_SPARSITIES)
    free = [k for k in prunable_layers(resnet20) if k not in first_and_last(resnet20)]
    scan = {"sparsities": grid, "layers": {k: [1 + (i % 3 + 1) * s ** 4 for s in grid] for i, k in enumerate(free)}}
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / sensitivity.repaired_scan_name(live.dense, live.task, config.compression_config())).write_text(
        json.dumps(scan))
    result = live.compress(config)
    assert result.sparsity == pytest.approx(0.9, abs=1e-3)
    densities = {k: float(layer.weight.ne(0).float().mean()) for k, layer in prunable_layers(result.model).items()}
    assert len({round(d, 2) for d in densities.values()}) > 2  # per layer, not one threshold's share everywhere
    config_back, problems = LiveConfig.from_query(config.to_query())
    assert config_back == config and not problems


def test_a_warmed_up_live_network_answers_its_default_view_from_what_it_made(monkeypatch):
    """`app_support.serve` warms the default page's network before the first visitor: afterwards the scores
    and the dense evaluation are made, and the same object serves every session."""
    from jpq_core import live

    monkeypatch.setattr(live, "_SHARED", {})
    network = live.shared_live_network("resnet20")
    assert live.shared_live_network("resnet20") is network
    config = LiveConfig(network="resnet20", criterion="taylor", recovery="none")
    assert not network.has_stats(config)
    network.warm_up(config)
    assert network.has_stats(config)
    dense = network.dense_evaluation()
    assert network.dense_evaluation() is dense and 0.5 < dense.metrics["top1"] <= 1.0
    with pytest.raises(JPQError, match="no shipped weights"):
        live.shared_live_network("tv:resnet18")
