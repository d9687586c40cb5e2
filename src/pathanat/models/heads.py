"""The lesion-segmentation head that reads the pathology group z_P and nothing else."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pathanat.models.blocks import conv1x1, conv3x3, upsample


class SegmentationHead(nn.Module):
    """Map a sample of z_P (B, C, H / 2^s, W / 2^s) to lesion logits (B, 1, H, W).

    ``s`` = ``upsamplings`` = L - P. Each step doubles the resolution and applies a 3x3 conv with
    SiLU; a final 1x1 conv gives one logit per pixel. Its only input is z_P, so whatever it needs
    to find a lesion must be encoded in that group -- that is what the supervision is for.
    """

    def __init__(self, latent_channels: int, width: int, upsamplings: int) -> None:
        super().__init__()
        self.stem = conv3x3(latent_channels, width)
        self.ups = nn.ModuleList(conv3x3(width, width) for _ in range(upsamplings))
        self.out = conv1x1(width, 1)

    def forward(self, z_p: Tensor) -> Tensor:
        h = F.silu(self.stem(z_p))
        for conv in self.ups:
            h = F.silu(conv(upsample(h)))
        return self.out(h).float()
