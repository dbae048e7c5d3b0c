"""A compact stereo network with 2D aggregation (StereoNet/DispNetC in spirit).

    left, right (full res)
      -> shared feature extractor: 1/2 res (24 ch) -> 1/4 res (32 ch, two residual blocks)
      -> correlation cost volume at 1/4 res over D = max_disparity / 4 shifts   (DispNetC)
      -> 2D aggregation of [cost volume, left context] with dilated convolutions, added to the scaled
         cost volume (a residual path, so matching works from the first step) -> D logits
      -> soft-argmin over the D shifts -> coarse disparity                          (GC-Net)
      -> bilinear upsampling to 1/2 res, refinement on [disparity, left 1/2-res features]
         predicting a residual (StereoNet's edge-aware refinement) -> upsampling to full res

Every aggregation is a 2D convolution, so the sparse integer engine needs no 3D kernels. Inputs of any
size are padded inside to a multiple of 8 and the output is cropped back.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Images arrive as RGB in [0, 1]; a fixed normalisation keeps them near zero mean, unit variance.
INPUT_MEAN, INPUT_STD = 0.45, 0.25


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (He et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return F.relu(x + self.body(x))


class FeatureExtractor(nn.Module):
    """Shared by both views. Returns 1/2-res features (for refinement) and 1/4-res matching features."""

    def __init__(self, half_channels: int = 24, channels: int = 32):
        super().__init__()
        self.half_res = nn.Sequential(conv_bn_relu(3, half_channels, stride=2), conv_bn_relu(half_channels, half_channels))
        self.quarter_res = nn.Sequential(
            conv_bn_relu(half_channels, channels, stride=2),
            ResidualBlock(channels),
            ResidualBlock(channels),
            nn.Conv2d(channels, channels, 3, 1, 1),
        )

    def forward(self, x):
        half = self.half_res(x)
        return half, self.quarter_res(half)


def correlation_volume(left: torch.Tensor, right: torch.Tensor, shifts: int) -> torch.Tensor:
    """cost[d](y, x) = mean_c left[c, y, x] * right[c, y, x - d] for d in [0, shifts); 0 where x < d."""
    n, c, h, w = left.shape
    volume = left.new_zeros(n, shifts, h, w)
    for d in range(shifts):
        if d == 0:
            volume[:, 0] = (left * right).mean(1)
        else:
            volume[:, d, :, d:] = (left[:, :, :, d:] * right[:, :, :, :-d]).mean(1)
    return volume


def soft_argmin(logits: torch.Tensor) -> torch.Tensor:
    """Expected shift under softmax(logits) over dim 1 (Kendall et al. 2017): N x D x H x W -> N x 1 x H x W."""
    shifts = torch.arange(logits.shape[1], dtype=logits.dtype, device=logits.device).view(1, -1, 1, 1)
    return (F.softmax(logits, dim=1) * shifts).sum(1, keepdim=True)


class StereoNet(nn.Module):
    """Compact stereo network; forward(left, right) returns full-resolution disparity N x H x W in pixels.

    In training mode it returns (full-res disparity, coarse disparity upsampled to full res) so that the
    loss can supervise both stages.
    """

    def __init__(self, max_disparity: int = 96, half_channels: int = 24, channels: int = 32,
                 aggregation_channels: int = 48, refine_channels: int = 32):
        super().__init__()
        if max_disparity % 4:
            raise ValueError("max_disparity must be a multiple of 4")
        self.max_disparity = max_disparity
        self.shifts = max_disparity // 4
        self.features = FeatureExtractor(half_channels, channels)
        self.context = nn.Sequential(nn.Conv2d(channels, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        a = aggregation_channels
        self.aggregation = nn.Sequential(
            conv_bn_relu(self.shifts + 16, a),
            conv_bn_relu(a, a, dilation=2),
            conv_bn_relu(a, a, dilation=4),
            conv_bn_relu(a, a, dilation=8),
            conv_bn_relu(a, a),
            nn.Conv2d(a, self.shifts, 3, 1, 1),
        )
        # The aggregation refines the raw matching cost instead of replacing it: logits = agg + scale * cost.
        # Without this path a 2D aggregation must first discover matching on its own, which it does slowly.
        self.cost_scale = nn.Parameter(torch.tensor(8.0))
        r = refine_channels
        self.refine = nn.Sequential(
            conv_bn_relu(half_channels + 1, r),
            conv_bn_relu(r, r, dilation=2),
            conv_bn_relu(r, r, dilation=4),
            conv_bn_relu(r, r),
            nn.Conv2d(r, 1, 3, 1, 1),
        )

    def forward(self, left: torch.Tensor, right: torch.Tensor):
        return self.forward_with_logits(left, right)[0]

    def forward_with_logits(self, left: torch.Tensor, right: torch.Tensor):
        """(forward's output, the matching logits N x D x H/4 x W/4 over the padded input that it came from):
        what distillation from the cost volume compares (`jpq_core.tasks.StereoTask.cost_distill_loss`)."""
        h, w = left.shape[-2:]
        half_left, cost, aggregated = self._matching(left, right)
        logits = aggregated + self.cost_scale * cost
        coarse = soft_argmin(logits) * 4.0  # in full-resolution pixels

        coarse_half = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
        residual = self.refine(torch.cat([half_left, coarse_half / self.max_disparity], 1))
        refined_half = F.relu(coarse_half + residual)
        full = F.interpolate(refined_half, scale_factor=2, mode="bilinear", align_corners=False)
        full = full[:, 0, :h, :w]
        if self.training:
            coarse_full = F.interpolate(coarse, scale_factor=4, mode="bilinear", align_corners=False)[:, 0, :h, :w]
            return (full, coarse_full), logits
        return full, logits

    def _matching(self, left: torch.Tensor, right: torch.Tensor):
        """Everything before the cost scale: (1/2-res left features, cost volume, aggregated cost)."""
        h, w = left.shape[-2:]
        pad = (0, (-w) % 8, 0, (-h) % 8)  # right and bottom, so disparities keep their meaning
        left = F.pad((left - INPUT_MEAN) / INPUT_STD, pad, mode="replicate")
        right = F.pad((right - INPUT_MEAN) / INPUT_STD, pad, mode="replicate")
        half_left, quarter_left = self.features(left)
        _, quarter_right = self.features(right)
        cost = correlation_volume(quarter_left, quarter_right, self.shifts)
        return half_left, cost, self.aggregation(torch.cat([cost, self.context(quarter_left)], 1))

    def scalar_stage(self, left: torch.Tensor, right: torch.Tensor):
        """For refitting `cost_scale` (`jpq_core.recovery.ScalarRefit`): runs the network up to the cost scale
        once and returns a function that finishes the matching with the scale's current value, the coarse
        disparity soft-argmin(aggregated + cost_scale * cost), which is what the scale changes (a search then
        costs one partial pass, not a forward pass per step)."""
        _, cost, aggregated = self._matching(left, right)
        return lambda: soft_argmin(aggregated + self.cost_scale * cost)
