"""The criterion interface: a criterion scores a network and yields keep-masks for a sparsity.

Two families implement it: weight-level criteria (`jpq_core.criteria`: any single weight can go) and
channel-level ones (`jpq_core.channels`: whole coupled channels go). Both are used the same way,

    masks = criterion.masks(model, sparsity, stats, groups=groups, protect=protect, allocation=allocation)

with `stats` the criterion's calibration statistics when `needs_gradients` (one gradient pass, see
`jpq_core.compression.gradient_stats`). The registry of every criterion by name is `jpq_core.registry`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Criterion:
    """Shared interface. `level` is "weight" or "channel"; `needs_gradients` says whether `stats` is used."""

    name = "criterion"
    level = "weight"
    needs_gradients = False

    def masks(self, model: nn.Module, sparsity: float, stats=None, *, groups=None, protect=frozenset(),
              allocation="global") -> dict[str, torch.Tensor]:
        """Keep-masks (weight-shaped, True = kept) for every prunable layer of `model`, removing `sparsity` of
        the prunable weights, lowest scores first.

        `protect`: layers kept dense (weight level; channel criteria leave out what their `groups` leave out);
        `allocation`: "global", "uniform" or {layer: sparsity} (weight level; channels are chosen globally);
        `groups`: the coupled channel groups (channel level, from `jpq_core.compression.trace_groups`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name
