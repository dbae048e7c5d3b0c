"""Residual networks for 32x32 inputs, built from torchvision's BasicBlock.

- ResNet-20 (He et al. 2016, section 4.2): a 3x3 stem with 16 channels, three stages of three basic blocks
  with 16/32/64 channels (stride 2 at each new stage), global average pooling and a linear classifier.
  Shortcuts that change shape use a 1x1 convolution with batch norm (the paper's option B), which is what
  torchvision's block expects.
- ResNet-18 from torchvision, adapted to 32x32 inputs the usual way (3x3 stride-1 stem, no max-pool), so a
  user can bring a checkpoint trained that way.
"""

from __future__ import annotations

import torch.nn as nn

# torchvision is imported where it is used: importing it takes seconds, which every process (the app's first
# render, each CLI call) would pay for the stereo network too.


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    from torchvision.models.resnet import BasicBlock

    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))
    layers = [BasicBlock(in_channels, out_channels, stride, downsample)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, blocks_per_stage: int = 3):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.stage1 = _stage(w, w, blocks_per_stage, 1)
        self.stage2 = _stage(w, 2 * w, blocks_per_stage, 2)
        self.stage3 = _stage(2 * w, 4 * w, blocks_per_stage, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the 32x32 stem: conv1 3x3 stride 1 and no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model
