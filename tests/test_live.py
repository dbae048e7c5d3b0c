"""The live view's compression: the same path as the pipeline's, and every slider change takes effect."""

from __future__ import annotations

import torch

from jpq_core.compression import compress_without_training
from jpq_core.layers import prunable_layers
from jpq_core.live import LiveConfig, LiveNetwork
from jpq_core.pipeline import CompressionConfig, compress


def test_keeping_the_first_layer_dense_is_honoured_for_channel_criteria_when_it_changes(resnet20):
    live = LiveNetwork("resnet20", resnet20)
    first = next(iter(prunable_layers(resnet20)))
    kept = LiveConfig(network="resnet20", criterion="group-l1", sparsity=0.6, wbits=None, abits=None, protect_first_last=True)
    freed = LiveConfig(**{**kept.__dict__, "protect_first_last": False})
    masks_kept = dict(live.compress(kept).model.named_modules())[first].parametrizations.weight[0].mask
    masks_freed = dict(live.compress(freed).model.named_modules())[first].parametrizations.weight[0].mask
    assert bool(masks_kept.all())  # the first layer's channels stay
    assert not bool(masks_freed.all())  # the second request, on the same live network, may prune them


def test_the_pipeline_without_fine_tuning_is_the_shared_path(resnet20, digits_task):
    config = CompressionConfig(network="resnet20", criterion="magnitude", sparsity=0.7, wbits=4, abits=8,
                               finetune="none", calibration_batches=2).check()
    net, _ = compress(resnet20, digits_task, config)
    again = compress_without_training(resnet20, digits_task, config)
    x = digits_task.test_x[:8]
    with torch.inference_mode():
        torch.testing.assert_close(net(x), again(x), rtol=0, atol=0)


def test_a_recovery_step_runs_between_weight_quantization_and_activation_calibration(resnet20, digits_task):
    seen = {}

    def recovery(net, task, config, dense):
        layer = next(iter(prunable_layers(net).values()))
        seen["wbits"] = layer.parametrizations.weight[0].bits
        seen["calibrated"] = hasattr(layer, "input_quantizer")
        seen["dense"] = dense is resnet20

    config = CompressionConfig(network="resnet20", criterion="magnitude", sparsity=0.5, wbits=4, abits=8,
                               finetune="none", calibration_batches=1).check()
    compress_without_training(resnet20, digits_task, config, recovery=recovery)
    assert seen == {"wbits": 4, "calibrated": False, "dense": True}
