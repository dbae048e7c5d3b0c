"""The compression pipeline: score, prune, quantize, fine-tune; in the order a pipeline names.

A compressed network is the original network with, on every convolution and linear layer:
- a weight parametrization w_eff = Q(w * mask) (torch.nn.utils.parametrize), Q = weight quantizer with a
  straight-through estimator, so the same module serves evaluation, masked fine-tuning and QAT, and a
  pruned weight is exactly zero in every forward pass;
- an input activation quantizer (forward pre-hook), calibrated on training data.

Pipelines, all with the same total fine-tuning budget of `steps`:
    prune-only          prune -> fine-tune
    quantize-only       quantize -> fine-tune (QAT)
    prune-then-quantize prune -> fine-tune (steps/2) -> quantize -> QAT (steps/2)      (the paper's two stages)
    quantize-then-prune quantize -> QAT (steps/2) -> prune (scores of the quantized net) -> fine-tune (steps/2)
    joint               quantize, then prune gradually (AGP) during QAT over all steps
Fine-tuning modes: none, masked (task loss), distill (task loss + the dense network's own outputs as soft
targets), regrow (masked, plus RigL-style mask updates: drop the smallest kept weights, grow the pruned
ones with the largest gradient; Evci et al. 2020).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from jpq_core.costs import layer_geometry, network_cost
from jpq_core.criteria import gather_gradient_stats, get_criterion, layer_weights, prunable_layers
from jpq_core.errors import JPQError
from jpq_core.pruning import agp_sparsity, check_sparsity, first_and_last, make_masks, sparsity_of
from jpq_core.quantization import ACTIVATION_BITS, ActivationQuantizer, check_bits, quantize_weight, ste

PIPELINES = ("prune-then-quantize", "quantize-then-prune", "joint", "prune-only", "quantize-only")
FINETUNE_MODES = ("none", "masked", "distill", "regrow")


@dataclass
class CompressionConfig:
    network: str = "stereo"
    criterion: str = "taylor"
    sparsity: float = 0.9
    wbits: int | None = 8
    abits: int | None = 8
    pipeline: str = "prune-then-quantize"
    finetune: str = "masked"
    steps: int = 200
    allocation: str = "global"
    protect_first_last: bool = True
    symmetric: bool = True
    per_channel: bool = True
    calibration: str = "minmax"
    calibration_batches: int = 8
    lr: float | None = None  # None: the task's default (fine-tuning rates differ by task)
    seed: int = 0

    def check(self) -> "CompressionConfig":
        check_sparsity(self.sparsity)
        self.wbits = check_bits(self.wbits)
        self.abits = check_bits(self.abits, ACTIVATION_BITS, "activation")
        get_criterion(self.criterion)
        if self.pipeline not in PIPELINES:
            raise JPQError(f"unknown pipeline {self.pipeline!r}; choose one of: {', '.join(PIPELINES)}.")
        if self.finetune not in FINETUNE_MODES:
            raise JPQError(f"unknown fine-tuning mode {self.finetune!r}; choose one of: {', '.join(FINETUNE_MODES)}.")
        if self.steps < 0:
            raise JPQError("steps must be 0 or more.")
        if self.allocation not in ("global", "uniform"):
            raise JPQError("allocation must be 'global' or 'uniform'.")
        return self


class MaskedQuantizedWeight(nn.Module):
    """Parametrization w -> Q(w * mask) with a straight-through estimator for Q."""

    def __init__(self, mask: torch.Tensor, bits, symmetric: bool, per_channel: bool):
        super().__init__()
        self.register_buffer("mask", mask.clone())
        self.bits, self.symmetric, self.per_channel = bits, symmetric, per_channel
        self.dense_grad: torch.Tensor | None = None  # filled when regrowth asks for it

    def forward(self, w):
        masked = w * self.mask
        if masked.requires_grad and self.dense_grad is not None:
            masked.register_hook(self._keep_grad)
        if self.bits is None:
            return masked
        return ste(masked, quantize_weight(masked.detach(), self.bits, self.symmetric, self.per_channel))

    def _keep_grad(self, g):
        self.dense_grad += g.detach().abs()


def _transform(layer) -> MaskedQuantizedWeight:
    return layer.parametrizations.weight[0]


def attach(model: nn.Module, masks: dict | None, wbits, symmetric=True, per_channel=True) -> nn.Module:
    """Give every prunable layer its mask and weight quantizer (replacing earlier ones)."""
    for name, layer in prunable_layers(model).items():
        mask = masks[name] if masks is not None else torch.ones_like(layer.weight, dtype=torch.bool)
        if parametrize.is_parametrized(layer, "weight"):
            t = _transform(layer)
            t.mask.copy_(mask)
            t.bits, t.symmetric, t.per_channel = wbits, symmetric, per_channel
        else:
            parametrize.register_parametrization(layer, "weight", MaskedQuantizedWeight(mask, wbits, symmetric, per_channel))
    return model


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _transform(l).mask.clone() for n, l in prunable_layers(model).items() if parametrize.is_parametrized(l, "weight")}


def attach_activation_quantizers(model: nn.Module, abits, method: str, task, batches: int, seed: int) -> nn.Module:
    """Quantize every prunable layer's input to `abits`, with ranges calibrated on training batches."""
    if abits is None:
        return model
    for layer in prunable_layers(model).values():
        if not hasattr(layer, "input_quantizer"):
            layer.input_quantizer = ActivationQuantizer(abits, method)
            layer.register_forward_pre_hook(lambda mod, args: (mod.input_quantizer(args[0]), *args[1:]))
        else:
            layer.input_quantizer.reset(abits, method)
    model.eval()
    with torch.inference_mode():
        for batch in task.batches(batches, seed=seed + 17):
            task.predict(model, batch)
    for layer in prunable_layers(model).values():
        layer.input_quantizer.finish_calibration()
    return model


def bake(model: nn.Module) -> nn.Module:
    """A copy whose weights are the effective (masked, quantized) values, parametrizations removed."""
    baked = copy.deepcopy(model)
    for layer in prunable_layers(baked).values():
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return baked


class _Budget:
    """Hands out the fine-tuning steps so that every pipeline spends exactly the same number."""

    def __init__(self, total: int):
        self.total, self.used = total, 0

    def take(self, share: float) -> int:
        n = min(self.total - self.used, math.ceil(self.total * share))
        self.used += n
        return n


def finetune(model, task, steps: int, mode: str, lr: float, seed: int, teacher=None, on_step=None, progress=None):
    """Fine-tune the parametrized model in place for `steps` steps.

    `on_step(step, steps)` runs before each step (gradual pruning uses it); regrowth updates the masks
    every 25 steps; `progress(i, n)` is told after each step.
    """
    if mode == "none" or steps == 0:
        return model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    layers = prunable_layers(model)
    regrow_every = 25
    if mode == "regrow":
        for layer in layers.values():
            _transform(layer).dense_grad = torch.zeros_like(_transform(layer).mask, dtype=torch.float32)
    for step, batch in enumerate(task.batches(steps, seed=seed)):
        if on_step:
            on_step(step, steps)
        if mode == "distill":
            with torch.no_grad():
                target = task.predict(teacher, batch)
            loss = task.distill_loss(model, target, batch)
        else:
            loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mode == "regrow" and (step + 1) % regrow_every == 0 and step + 1 < steps:
            _regrow(layers, drop_fraction=0.3 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        if progress:
            progress(step + 1, steps)
    if mode == "regrow":
        for layer in layers.values():
            _transform(layer).dense_grad = None
    model.eval()
    return model


@torch.no_grad()
def _regrow(layers, drop_fraction: float) -> None:
    """RigL update per layer: drop the kept weights of smallest |w|, grow as many pruned weights with the
    largest accumulated |gradient|, starting at zero. The layer's sparsity is unchanged."""
    for layer in layers.values():
        t = _transform(layer)
        mask, w = t.mask, layer.parametrizations.weight.original
        kept = int(mask.sum())
        n = int(drop_fraction * kept)
        if n == 0 or kept == mask.numel():
            t.dense_grad.zero_()
            continue
        drop_score = torch.where(mask, w.abs(), torch.full_like(w, float("inf")))
        drop = torch.topk(drop_score.flatten(), n, largest=False).indices
        grow_score = torch.where(mask, torch.full_like(w, -1.0), t.dense_grad)
        grow = torch.topk(grow_score.flatten(), n).indices
        flat = mask.flatten()
        flat[drop] = False
        flat[grow] = True
        w.view(-1)[grow] = 0.0
        t.dense_grad.zero_()


def prune_masks(model, task, config: CompressionConfig, sparsity: float, stats_cache=None, progress=None):
    """Masks for `sparsity` from the config's criterion, computed on the model as it is now."""
    criterion = get_criterion(config.criterion)
    weights = {k: v.detach().clone() for k, v in _effective_weights(model).items()}
    stats = None
    if criterion.needs_gradients:
        stats = stats_cache if stats_cache is not None else gather_gradient_stats(
            model, task.batches(config.calibration_batches, seed=config.seed + 1), task.loss, progress)
    scores = criterion.scores(weights, stats)
    protect = first_and_last(model) if config.protect_first_last else set()
    return make_masks(scores, {k: w.shape for k, w in weights.items()}, sparsity, config.allocation, protect)


def _effective_weights(model):
    return {n: l.weight.detach() for n, l in prunable_layers(model).items()}


def compress(model: nn.Module, task, config: CompressionConfig, progress=None) -> tuple[nn.Module, dict]:
    """Run the configured pipeline on a copy of `model`; returns (compressed model, report)."""
    config = config.check()
    start = time.time()
    torch.manual_seed(config.seed)
    dense = copy.deepcopy(model).eval()
    net = copy.deepcopy(model).eval()
    budget = _Budget(config.steps if config.finetune != "none" else 0)
    prune = config.pipeline != "quantize-only"
    quant = config.pipeline != "prune-only"
    wbits, abits = (config.wbits, config.abits) if quant else (None, None)
    lr = config.lr if config.lr is not None else task.default_lr
    ft = dict(task=task, mode=config.finetune, lr=lr, teacher=dense, progress=progress)
    attach(net, None, None)

    def quantize_now():
        attach(net, current_masks(net), wbits, config.symmetric, config.per_channel)
        attach_activation_quantizers(net, abits, config.calibration, task, config.calibration_batches, config.seed)

    if config.pipeline in ("prune-only", "prune-then-quantize"):
        attach(net, prune_masks(net, task, config, config.sparsity), None)
        finetune(net, steps=budget.take(0.5 if quant else 1.0), seed=config.seed, **ft)
        if quant:
            quantize_now()
            finetune(net, steps=budget.take(1.0), seed=config.seed + 1, **ft)
    elif config.pipeline in ("quantize-only", "quantize-then-prune"):
        quantize_now()
        finetune(net, steps=budget.take(0.5 if prune else 1.0), seed=config.seed, **ft)
        if prune:
            attach(net, prune_masks(net, task, config, config.sparsity), wbits, config.symmetric, config.per_channel)
            finetune(net, steps=budget.take(1.0), seed=config.seed + 1, **ft)
    else:  # joint: gradual pruning during quantization-aware training
        quantize_now()
        steps = budget.take(1.0)
        stats = gather_gradient_stats(net, task.batches(config.calibration_batches, seed=config.seed + 1), task.loss) \
            if get_criterion(config.criterion).needs_gradients else None
        prune_every = max(1, steps // 10)

        def gradual(step, total):
            if step % prune_every == 0:
                s = agp_sparsity(step + prune_every, total, config.sparsity)
                attach(net, prune_masks(net, task, config, s, stats), wbits, config.symmetric, config.per_channel)
        if steps == 0:
            attach(net, prune_masks(net, task, config, config.sparsity, stats), wbits, config.symmetric, config.per_channel)
        else:
            finetune(net, steps=steps, seed=config.seed, on_step=gradual, **ft)
            attach(net, prune_masks(net, task, config, config.sparsity, stats), wbits, config.symmetric, config.per_channel)
    net.eval()
    masks = current_masks(net)
    geometry = layer_geometry(net, task.example_inputs())
    cost = network_cost(net, masks, wbits, abits, geometry, config.per_channel)
    report = {
        "network": config.network,
        "config": asdict(config),
        "metrics": task.evaluate(net),
        "dense_metrics": task.evaluate(dense),
        "sparsity": sparsity_of(masks),
        "cost": cost,
        "finetune_steps": budget.used,
        "seconds": round(time.time() - start, 1),
    }
    return net, report
