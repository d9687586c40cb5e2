"""Convolutional building blocks of the encoder and decoder trunks.

Chosen for speed on CPUs with bf16 matrix units (AMX) as much as for quality: every block is a
short chain of 3x3 convolutions with SiLU between them and no normalisation layer. A
BatchNorm/GroupNorm per conv (as in NVAE's cells) adds several memory-bound elementwise passes for
each compute-bound conv, and on CPU those passes, not the convs, set the step time. All blocks are
layout-agnostic (conv, SiLU, add, average pooling, nearest upsampling), so a model converted to
``channels_last`` stays in that layout through the whole hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


class ResidualCell(nn.Module):
    """``x + conv(silu(conv(silu(x))))`` at constant width.

    The second conv starts with its weights scaled by ``residual_scale`` (about 1/sqrt(number of
    cells in the trunk), as in VDVAE) so that a deep stack starts close to the identity and the
    variance of the residual stream does not grow with depth.
    """

    def __init__(self, width: int, residual_scale: float) -> None:
        super().__init__()
        self.conv1 = conv3x3(width, width)
        self.conv2 = conv3x3(width, width)
        with torch.no_grad():
            self.conv2.weight.mul_(residual_scale)
            self.conv2.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


def residual_stack(width: int, cells: int, residual_scale: float) -> nn.Sequential:
    """``cells`` residual cells in a row (an empty stack is the identity)."""
    return nn.Sequential(*(ResidualCell(width, residual_scale) for _ in range(cells)))


def downsample(x: Tensor) -> Tensor:
    """Halve H and W by 2x2 average pooling (H and W are even: inputs are padded to 2^L)."""
    return F.avg_pool2d(x, kernel_size=2)


def upsample(x: Tensor) -> Tensor:
    """Double H and W by nearest-neighbour repetition (the following conv smooths it)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def width_change(in_width: int, out_width: int) -> nn.Module:
    """A 1x1 conv between scales of different trunk widths; the identity where they agree."""
    return nn.Identity() if in_width == out_width else conv1x1(in_width, out_width)


def small_init_(conv: nn.Conv2d, scale: float) -> nn.Conv2d:
    """Scale a conv's initial weights and zero its bias; returns the conv.

    Used on the heads that emit distribution parameters so a fresh model starts with posteriors
    close to their priors (small KL) and unit scales.
    """
    with torch.no_grad():
        conv.weight.mul_(scale)
        conv.bias.zero_()
    return conv
