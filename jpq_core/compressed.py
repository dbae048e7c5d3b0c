"""The compressed layer: a weight parametrization w_eff = Q(w * mask) and an input activation quantizer.

A compressed network is the original network with, on every convolution and linear layer:
- a weight parametrization w_eff = Q(w * mask) (torch.nn.utils.parametrize), Q = weight quantizer with a
  straight-through estimator, so the same module serves evaluation, masked fine-tuning and QAT, and a
  pruned weight is exactly zero in every forward pass;
- an input activation quantizer (forward pre-hook), calibrated on training data.

`attach` puts (or updates) masks and weight quantizers, `add_activation_quantizers` and
`calibrate_activations` the input quantizers, `detach` gives the plain network back. Code outside this
module reads a compressed layer through `transform`, `raw_weight`, `layer_mask`, `layer_bits` and
`activation_bits`, never through torch's parametrization attributes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from jpq_core.errors import JPQError
from jpq_core.layers import prunable_layers
from jpq_core.quantization import ActivationQuantizer, learned_step_quantize, quantize_weight, step_bound, ste


class MaskedQuantizedWeight(nn.Module):
    """Parametrization w -> Q(w * mask) with a straight-through estimator for Q; with a learned step (LSQ,
    symmetric 3-16 bits), Q uses it as its scale, capped at max|w| / qmax.

    The step is learned as its logarithm, `log_step`: Adam's updates do not depend on the gradient's scale, so
    a step learned directly would move by about the learning rate per update (1e-3 against steps of 1e-3 to
    1e-1: measured, ResNet-20 at 4 bits lost 10.6 points of top-1 that way); its logarithm moves by about
    0.1% of the step per update."""

    def __init__(self, mask: torch.Tensor, bits, symmetric: bool, per_channel: bool):
        super().__init__()
        self.register_buffer("mask", mask.clone())
        self.bits, self.symmetric, self.per_channel = bits, symmetric, per_channel
        self.register_parameter("log_step", None)
        self._step_bits = None
        self.dense_grad: torch.Tensor | None = None  # filled when regrowth asks for it

    def forward(self, w):
        masked = w * self.mask
        if masked.requires_grad and self.dense_grad is not None:
            masked.register_hook(self._keep_grad)
        if self.bits is None:
            return masked
        if self.log_step is not None:
            return learned_step_quantize(masked, self.log_step.exp(), self.bits, self.per_channel)
        return ste(masked, quantize_weight(masked.detach(), self.bits, self.symmetric, self.per_channel))

    def learn_step(self, weight: torch.Tensor, learned: bool) -> None:
        """Give this layer a learned step, starting at min/max's (kept while the width stays), or take it away."""
        if not (learned and self.bits is not None and self.bits >= 3 and self.symmetric):
            self.log_step = None
        else:
            bound = step_bound(weight * self.mask, self.bits, self.per_channel)
            if self.log_step is None or self._step_bits != self.bits or self.log_step.shape != bound.shape:
                self.log_step = nn.Parameter(bound.log())
        self._step_bits = self.bits

    @torch.no_grad()
    def project_step(self, weight: torch.Tensor) -> None:
        """Keep the learned step at or below its bound after an optimiser step (projected gradient descent):
        above it the cap would hide the step from its gradient and it could drift up for good."""
        if self.log_step is not None:
            bound = step_bound(weight * self.mask, self.bits, self.per_channel)
            self.log_step.copy_(torch.minimum(self.log_step, bound.log()))

    def _keep_grad(self, g):
        self.dense_grad += g.detach().abs()


# ---- the named accessors: everything else reads a compressed layer through these --------------------------


def transform(layer: nn.Module) -> MaskedQuantizedWeight | None:
    """The layer's mask-and-quantize parametrization, or None for a plain layer."""
    return layer.parametrizations.weight[0] if parametrize.is_parametrized(layer, "weight") else None


def raw_weight(layer: nn.Module) -> torch.Tensor:
    """The parameter the optimiser updates and gradients land on: the weight under the parametrization
    (before mask and quantizer) on a compressed layer, the weight itself on a plain one."""
    return layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight


def layer_mask(layer: nn.Module) -> torch.Tensor | None:
    """The layer's keep-mask (True = kept), or None for a plain layer."""
    t = transform(layer)
    return None if t is None else t.mask


def layer_bits(layer: nn.Module):
    """The layer's weight bit width (None = float, also for a plain layer)."""
    t = transform(layer)
    return None if t is None else t.bits


def activation_bits(layer: nn.Module):
    """The bit width of the layer's input quantizer (None = float, also without one)."""
    quantizer = getattr(layer, "input_quantizer", None)
    return None if quantizer is None else quantizer.bits


def bits_for(spec, name):
    """Bit width of layer `name` from one width for all layers or a {layer: width} dict."""
    return spec.get(name) if isinstance(spec, dict) else spec


def attach(model: nn.Module, masks: dict | None, wbits, symmetric=True, per_channel=True, learned_step=False) -> nn.Module:
    """Give every prunable layer its mask and weight quantizer (replacing earlier ones).

    `wbits` is one width for all layers or {layer: width}; None means float. `learned_step`: layers at
    3-16 bits learn their step (LSQ); a step already learned is kept while the layer's width stays.
    """
    for name, layer in prunable_layers(model).items():
        mask = masks[name] if masks is not None else torch.ones_like(layer.weight, dtype=torch.bool)
        bits = bits_for(wbits, name)
        if parametrize.is_parametrized(layer, "weight"):
            t = transform(layer)
            t.mask.copy_(mask)
            t.bits, t.symmetric, t.per_channel = bits, symmetric, per_channel
        else:
            parametrize.register_parametrization(layer, "weight", MaskedQuantizedWeight(mask, bits, symmetric, per_channel))
        transform(layer).learn_step(raw_weight(layer), learned_step)
    return model


def project_steps(model: nn.Module) -> None:
    """Cap every learned step at its bound (after each optimiser step)."""
    for layer in prunable_layers(model).values():
        if parametrize.is_parametrized(layer, "weight"):
            transform(layer).project_step(raw_weight(layer))


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: transform(l).mask.clone() for n, l in prunable_layers(model).items() if parametrize.is_parametrized(l, "weight")}


def _quantize_input(layer, args):
    return (layer.input_quantizer(args[0]), *args[1:])


def add_activation_quantizers(model: nn.Module, abits, method: str = "minmax") -> nn.Module:
    """Put an (uncalibrated) input quantizer on every prunable layer; `abits` one width or {layer: width}."""
    for name, layer in prunable_layers(model).items():
        bits = bits_for(abits, name)
        if hasattr(layer, "input_quantizer"):
            layer.input_quantizer.reset(bits, method)
        else:
            layer.input_quantizer = ActivationQuantizer(bits, method)
            layer.register_forward_pre_hook(_quantize_input)
    return model


def calibration_batches(task, batches: int, seed: int):
    """The training batches activation calibration runs (`batches` of them, for the run's `seed`): also what
    the engine benchmark calibrates ONNX Runtime's int8 quantization on (`jpq_core.engine.peers`)."""
    return task.batches(batches, seed=seed + 17)


def calibrate_activations(model: nn.Module, task, batches: int, seed: int) -> nn.Module:
    """Run training batches through the network and fix every input quantizer's range."""
    model.eval()
    with torch.inference_mode():
        for batch in calibration_batches(task, batches, seed):
            task.predict(model, batch)
    unseen = [name for name, layer in prunable_layers(model).items()
              if layer.input_quantizer.bits is not None and not layer.input_quantizer.samples]
    if unseen:  # named here: the quantizer alone cannot say which layer it belongs to
        raise JPQError(f"activation calibration saw no data at {len(unseen)} layer(s) ({', '.join(unseen[:3])}"
                       f"{', ...' if len(unseen) > 3 else ''}): the network's forward in eval mode does not run them "
                       "(an auxiliary classifier used only in training, as GoogLeNet's and Inception-v3's?).")
    for layer in prunable_layers(model).values():
        if layer.input_quantizer.bits is not None:
            layer.input_quantizer.finish_calibration()
        else:
            layer.input_quantizer.samples.clear()
            layer.input_quantizer.calibrating = False
    return model


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer: effective (masked, quantized) weight}, detached."""
    return {n: l.weight.detach() for n, l in prunable_layers(model).items()}


def effective_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain network that computes what `model` computes: each parametrized weight
    replaced by its effective (masked, quantized) value. (Removing parametrizations from a deep copy is no
    option: the copy shares its parametrized class with the original and would break it.)"""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations.weight." not in k}
    for name, layer in prunable_layers(model).items():
        state[f"{name}.weight"] = layer.weight.detach().clone()
    return state


def detach(model: nn.Module) -> nn.Module:
    """A plain copy of `model`: every weight fixed at its effective (masked, quantized) value, no
    parametrizations, no input quantizers; `model` is not changed.

    (torch's remove_parametrizations would delete the weight property from the parametrized class, which a
    deep copy shares with the original, and so break the original: the copy's layers are given their plain
    class back instead.)"""
    plain = copy.deepcopy(model)
    for layer in prunable_layers(plain).values():
        if parametrize.is_parametrized(layer, "weight"):
            weight = layer.weight.detach().clone()
            layer.__class__ = layer.__class__.__bases__[0]  # the parametrized class derives from the plain one
            del layer._modules["parametrizations"]
            layer.weight = nn.Parameter(weight)
        for key, hook in list(layer._forward_pre_hooks.items()):
            if hook is _quantize_input:
                del layer._forward_pre_hooks[key]
        if hasattr(layer, "input_quantizer"):
            del layer.input_quantizer
    return plain
