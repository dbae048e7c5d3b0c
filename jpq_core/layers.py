"""Layer discovery: which layers compression acts on, by module name.

Every convolution and linear layer is prunable and quantizable; the first and the last are the usual
candidates for protection (they hold few weights and cost much accuracy when pruned).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every convolution and linear layer, by module name, in forward-definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def first_and_last(model: nn.Module) -> set[str]:
    """Names of the first and the last prunable layer, the usual candidates for protection."""
    names = list(prunable_layers(model))
    return {names[0], names[-1]} if names else set()


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The (effective) weight of every prunable layer, detached."""
    return {name: m.weight.detach() for name, m in prunable_layers(model).items()}
