"""From a configuration to a compressed network, without fine-tuning: prune -> quantize -> calibrate -> (recover).

`compress_without_training` is the one path every caller shares: the live view (`jpq_core.live`), the engine
benchmark (`jpq_core.engine.bench`), and the pipeline (`jpq_core.pipeline.compress`) whenever it has nothing
to fine-tune between its stages; the pipeline's staged runs use the same steps (`prune_masks`,
`layer_widths`, `jpq_core.compressed.attach`, activation calibration) with fine-tuning in between.

`config` is a `jpq_core.pipeline.CompressionConfig` (or anything with its fields); this module does not
import the pipeline, which imports it.
"""

from __future__ import annotations

import copy
import time

import torch.nn as nn
from torch.nn.utils import parametrize

from jpq_core.channels import channel_groups, gather_group_stats
from jpq_core.compressed import add_activation_quantizers, attach, calibrate_activations, current_masks
from jpq_core.errors import JPQError
from jpq_core.layers import first_and_last, prunable_layers
from jpq_core.registry import get_criterion
from jpq_core.score_cache import cached_gradient_stats


def compress_without_training(model: nn.Module, task, config, *, stats=None, groups=None, allocation=None,
                              calibration_task=None, calibration_batches: int | None = None, recovery=None,
                              progress=None, timings: dict | None = None, recovered: dict | None = None) -> nn.Module:
    """A compressed copy of `model` (which is not changed), in eval mode:

    1. prune: masks from `config.criterion` at `config.sparsity`, scored on the dense network (`stats`, the
       criterion's calibration statistics, are reused when given; channel criteria need `groups`, see
       `trace_groups`; `allocation`, a per-layer sparsity dict, overrides `config.allocation`);
    2. quantize the weights: `config.wbits`, per-layer overrides `config.layer_wbits`;
    3. quantize the activations: `config.abits` (per-layer `config.layer_abits`), ranges calibrated on
       `calibration_batches` batches of `calibration_task` (default: `task`, `config.calibration_batches`);
    4. recover (optional, `recover`): `recovery(net, task, config, dense=model)`, by default the methods
       `config.recovery` names (`jpq_core.recovery`), runs on the compressed network; `recovery=False` skips
       it. It may change the kept weights, batch-norm statistics and, for OBC, which weights a layer keeps, not
       how many, nor the bit widths or the activation ranges: refitting the ranges after least squares measured worse (stereo 90%, w4/a8: bad-3 47.8% against
       41.0%, docs/recovery.md). What it returns (a dict, e.g. `recovery.apply`'s report) goes into `recovered`.

    `progress(i, n)` is told about the gradient pass; `timings`, when given, receives seconds per step
    ("masks", "calibrate", "recovery").
    """
    timings = {} if timings is None else timings
    start = time.perf_counter()
    net = attach(copy.deepcopy(model).eval(), None, None)  # scores are taken through the parametrization
    masks = prune_masks(net, task, config, config.sparsity, stats, groups, progress, allocation)
    wbits = layer_widths(net, config.wbits, config.layer_wbits, config.network)
    abits = layer_widths(net, config.abits, config.layer_abits, config.network)
    attach(net, masks, wbits, config.symmetric, config.per_channel, config.learned_step)
    timings["masks"] = time.perf_counter() - start

    start = time.perf_counter()
    if any(b is not None for b in abits.values()):
        add_activation_quantizers(net, abits, config.calibration)
        with parametrize.cached():  # the weights are fixed while calibrating: quantize each once, not per call
            calibrate_activations(net, calibration_task or task, calibration_batches or config.calibration_batches,
                                  config.seed)
    timings["calibrate"] = time.perf_counter() - start

    return recover(net, model, task, config, recovery, timings, recovered) if recovery is not False else net.eval()


def recover(net: nn.Module, dense: nn.Module, task, config, recovery=None, timings: dict | None = None,
            recovered: dict | None = None) -> nn.Module:
    """Step 4 of `compress_without_training`, on its result `net` (changed in place and returned): the
    `recovery` step, by default the methods `config.recovery` names. Callers that keep the network before
    recovery (the live view shows both) run steps 1-3 with `recovery=False`, then this on a copy."""
    timings = {} if timings is None else timings
    recovery = configured_recovery(config) if recovery is None else recovery
    if recovery:
        masks = current_masks(net)
        start = time.perf_counter()
        report = recovery(net, task, config, dense=dense)
        if recovered is not None and isinstance(report, dict):
            recovered.update(report)
        timings["recovery"] = time.perf_counter() - start
        kept = current_masks(net)
        changed = [k for k, m in masks.items() if int(kept[k].sum()) != int(m.sum())]
        if changed:
            raise JPQError(f"the recovery step changed how many weights {', '.join(changed)} keep; recovery may change "
                           "which weights are kept, not how many.")
    return net.eval()


def configured_recovery(config):
    """The recovery step `config.recovery` names ("none": None), as `compress_without_training` calls it."""
    methods = getattr(config, "recovery", "none")
    if methods == "none":
        return None
    from jpq_core import recovery

    return lambda net, task, config, dense: recovery.apply(net, dense, task, methods, config.recovery_samples, config.seed)


def layer_widths(model: nn.Module, default, overrides: dict, network: str = "network") -> dict:
    """{layer: bit width}: `default` for every prunable layer, `overrides` ({layer: width}) where given."""
    names = list(prunable_layers(model))
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise JPQError(f"no layer named {', '.join(unknown)} in {network}; layers are: {', '.join(names)}.")
    return {name: overrides.get(name, default) for name in names}


def trace_groups(model: nn.Module, task, protect_first_last: bool):
    """The coupled channel groups of `model` (see `jpq_core.channels`); with `protect_first_last`, the first
    layer's output channels are left alone (the last layer's are network outputs, never pruned anyway)."""
    ignored = [next(iter(prunable_layers(model)))] if protect_first_last else []
    return channel_groups(model, task.trace_inputs(), ignored_layers=ignored)


def prune_masks(model, task, config, sparsity: float, stats=None, groups=None, progress=None, allocation=None):
    """Masks for `sparsity` from the config's criterion, computed on the model as it is now.

    Weight-level criteria score every weight; channel-level ones score the coupled channel `groups`
    (from `trace_groups`) and remove whole channels. `stats` are reused when given;
    `allocation` (a per-layer sparsity dict) overrides the config's.
    """
    criterion = get_criterion(config.criterion)
    if criterion.needs_gradients and stats is None:
        stats = gradient_stats(model, task, config, criterion, groups, progress)
    protect = first_and_last(model) if config.protect_first_last else set()
    return criterion.masks(model, sparsity, stats, groups=groups, protect=protect, allocation=allocation or config.allocation)


def gradient_stats(model, task, config, criterion, groups=None, progress=None):
    """One pass over the calibration batches: per-weight statistics, or per-channel ones for channel criteria."""
    if criterion.level == "channel":
        return gather_group_stats(model, groups, task.batches(config.calibration_batches, seed=config.seed + 1), task.loss, progress)
    return cached_gradient_stats(model, task, config.calibration_batches, config.seed + 1, progress=progress)
