"""Importance criteria: which weights (or channels) matter.

Every criterion is one small class with one method, `scores(weights, stats)`, returning a score per weight
(same shape as the weight) for weight-level criteria, or a score per output channel for channel-level ones.
Higher means more important; pruning removes the lowest scores.

Gradient-based criteria read `GradientStats`, gathered once per (network, calibration data) in a single
pass; all criteria then come from that one pass in milliseconds, so moving a sparsity slider never
recomputes gradients. With g_b = dL/dw on calibration batch b (b = 1..B) and w the weight:

    mean_gw_abs = 1/B sum_b |g_b * w|        mean_gw_sq = 1/B sum_b (g_b * w)^2
    mean_g_sq   = 1/B sum_b g_b^2             mean_g_abs = 1/B sum_b |g_b|

Channel-level criteria, which must score coupled channels (residual adds, shared layers) together, live in
`jpq_core.channels`; both implement `jpq_core.criterion.Criterion`, and `jpq_core.registry.get_criterion`
returns either kind by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from jpq_core.compressed import effective_weights, raw_weight
from jpq_core.criterion import Criterion
from jpq_core.errors import JPQError
from jpq_core.layers import prunable_layers
from jpq_core.pruning import make_masks

Scores = dict[str, torch.Tensor]


@dataclass
class GradientStats:
    """Per-weight gradient statistics over a calibration set (see the module docstring)."""

    mean_gw_abs: Scores
    mean_gw_sq: Scores
    mean_g_sq: Scores
    mean_g_abs: Scores
    batches: int


def gather_gradient_stats(model: nn.Module, batches, loss_fn, progress=None) -> GradientStats:
    """One backward pass per calibration batch; `loss_fn(model, batch) -> scalar loss`.

    `progress(i, n)` is called after each batch (for progress bars). The model's weights are not changed
    and it is left in eval mode (batch norm uses its running statistics, as at inference).
    """
    layers = prunable_layers(model)
    model.eval()
    acc = {k: {n: torch.zeros_like(m.weight) for n, m in layers.items()} for k in ("gw_abs", "gw_sq", "g_sq", "g_abs")}
    batches = list(batches)
    for i, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        for name, m in layers.items():
            # On a compressed layer the gradient lands on the raw parameter; through the straight-through
            # estimator it equals the gradient of the effective weight wherever that weight is kept.
            g, w = raw_weight(m).grad.detach(), m.weight.detach()
            gw = g * w
            acc["gw_abs"][name] += gw.abs()
            acc["gw_sq"][name] += gw**2
            acc["g_sq"][name] += g**2
            acc["g_abs"][name] += g.abs()
        if progress:
            progress(i + 1, len(batches))
    model.zero_grad(set_to_none=True)
    n = max(1, len(batches))
    mean = {k: {name: v / n for name, v in d.items()} for k, d in acc.items()}
    return GradientStats(mean["gw_abs"], mean["gw_sq"], mean["g_sq"], mean["g_abs"], len(batches))


class WeightCriterion(Criterion):
    """A criterion that scores every weight: `scores(weights, stats)` -> {layer: score per weight}; the masks
    keep the highest scores (`jpq_core.pruning.make_masks`)."""

    level = "weight"

    def scores(self, weights: Scores, stats: GradientStats | None = None) -> Scores:
        raise NotImplementedError

    def masks(self, model, sparsity, stats=None, *, groups=None, protect=frozenset(), allocation="global"):
        if allocation == "sensitivity":
            raise JPQError("sensitivity allocation needs a scan; compress() runs one (see jpq_core.sensitivity).")
        weights = {k: v.detach().cpu().clone() for k, v in effective_weights(model).items()}  # where stats are
        scores = self.scores(weights, stats)
        return make_masks(scores, {k: w.shape for k, w in weights.items()}, sparsity, allocation, protect)


def _normalise_per_layer(scores: Scores) -> Scores:
    """Divide each layer's scores by their L2 norm (Molchanov et al. 2017), so layers compete fairly."""
    return {k: v / (v.norm() + 1e-30) for k, v in scores.items()}


# ---- weight level ------------------------------------------------------------------------------------


class Magnitude(WeightCriterion):
    """|w| (Han et al., NeurIPS 2015, "Learning both Weights and Connections")."""

    name = "magnitude"

    def scores(self, weights, stats=None):
        return {k: w.abs() for k, w in weights.items()}


class Taylor(WeightCriterion):
    """First-order Taylor estimate of the loss change when w is removed (Molchanov et al., ICLR 2017 and
    CVPR 2019): form "abs" = mean_b |g_b * w|, form "square" = mean_b (g_b * w)^2. With `normalise`, each
    layer's scores are divided by their L2 norm (the 2017 paper); without, all layers are pooled as in
    NVlabs' code. The JPQ paper's exact form is not published, so all four variants are offered.
    """

    needs_gradients = True

    def __init__(self, form: str = "abs", normalise: bool = False):
        if form not in ("abs", "square"):
            raise ValueError("Taylor form must be 'abs' or 'square'")
        self.form, self.normalise = form, normalise
        self.name = f"taylor-{form}" + ("-norm" if normalise else "")

    def scores(self, weights, stats):
        s = stats.mean_gw_abs if self.form == "abs" else stats.mean_gw_sq
        s = {k: s[k].clone() for k in weights}
        return _normalise_per_layer(s) if self.normalise else s


class Fisher(WeightCriterion):
    """Optimal Brain Damage with the empirical diagonal Fisher as Hessian (LeCun et al., 1990):
    0.5 * E[g^2] * w^2."""

    name = "fisher"
    needs_gradients = True

    def scores(self, weights, stats):
        return {k: 0.5 * stats.mean_g_sq[k] * w**2 for k, w in weights.items()}


class SNIP(WeightCriterion):
    """Connection sensitivity |g * w| normalised to sum 1 over the network (Lee et al., ICLR 2019)."""

    name = "snip"
    needs_gradients = True

    def scores(self, weights, stats):
        total = sum(stats.mean_gw_abs[k].sum() for k in weights) + 1e-30
        return {k: stats.mean_gw_abs[k] / total for k in weights}


class GradientMagnitude(WeightCriterion):
    """mean_b |g_b|: a weak baseline that shows why the weight factor in Taylor matters."""

    name = "gradient"
    needs_gradients = True

    def scores(self, weights, stats):
        return {k: stats.mean_g_abs[k].clone() for k in weights}


class Random(WeightCriterion):
    """Uniform random scores: the baseline every criterion must beat. Deterministic in `seed`."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.name = f"random-{seed}" if seed else "random"

    def scores(self, weights, stats=None):
        g = torch.Generator().manual_seed(self.seed)
        return {k: torch.rand(w.shape, generator=g) for k, w in weights.items()}
