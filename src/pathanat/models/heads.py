"""The heads: convs from a trunk state to what the model outputs -- the Gaussian of a latent group
(:class:`GaussianHead`), the pixel likelihood's mean and scale (:func:`likelihood_parameters`),
and the lesion logits read from the pathology group z_P alone (:class:`SegmentationHead`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathanat.models.blocks import conv1x1, conv3x3, small_init_, upsample
from pathanat.models.distributions import DiagonalGaussian

# log-scale of the pixel likelihood, smoothly bounded to (X_LOG_SCALE_MIN, X_LOG_SCALE_MAX) by a
# scaled sigmoid: sigma_x in (0.018, 7.4) on standardised intensities, starting at exp(-1) ~ 0.37.
# The floor is the stability knob: with a floor of exp(-5) per-pixel scales collapsed on a few
# pixels and a small shift of the mean then gave loss spikes of 100x (seen at lr 1e-3..2e-3);
# 0.018 standard deviations is still far below the error of any reconstruction we measure.
X_LOG_SCALE_MIN = -4.0
X_LOG_SCALE_MAX = 2.0
# Distribution heads start with weights scaled by this so a new model has posteriors near their
# priors and unit scales (small, finite KL at step 0).
HEAD_INIT_SCALE = 0.1


def _fp32_conv(conv: nn.Conv2d, h: Tensor) -> Tensor:
    """Run ``conv`` in float32 even under autocast (the likelihood head: its mean must resolve
    pixel differences far below bf16's 3 significant digits for an honest NLL)."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        return _GradInLayout.apply(conv(h.float()))


def likelihood_parameters(conv: nn.Conv2d, h: Tensor) -> tuple[Tensor, Tensor]:
    """The per-pixel mean and bounded log-scale of p(x | z) from the likelihood head ``conv``
    (2 x C outputs), in float32."""
    mean, raw_log_scale = _fp32_conv(conv, h).chunk(2, dim=1)
    span = X_LOG_SCALE_MAX - X_LOG_SCALE_MIN
    return mean, X_LOG_SCALE_MIN + span * torch.sigmoid(raw_log_scale)


class _GradInLayout(torch.autograd.Function):
    """Identity whose backward hands on the gradient in the forward tensor's memory layout.

    The KL and density code reduces and broadcasts, which leaves the gradient of a head's output
    in the default layout; a channels_last conv fed such a gradient converts layouts internally
    and its backward became the slowest op of the step. Copying the small (2-channel) gradient
    once is far cheaper.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if ctx.channels_last:
            return grad.contiguous(memory_format=torch.channels_last)
        return grad.contiguous()


def _head_output(conv: nn.Conv2d, h: Tensor) -> Tensor:
    """``conv(h)`` cast to float32, its gradient kept in the conv's layout."""
    return _GradInLayout.apply(conv(h)).float()


class GaussianHead(nn.Module):
    """One 3x3 conv from a state to the raw (mean, log-scale) of a latent group, split in two.

    It runs in the trunk's precision (bf16 under autocast: a float32 copy of the full-resolution
    state per head would cost more than the head); its output is cast up to float32 before it is
    bounded. One conv of 2C outputs rather than two of C: in oneDNN a 3x3 conv's forward and
    backward cost about the same for 2 outputs as for 4 (40 vs 36 ms from 32 channels at
    16 x 96 x 112, channels_last), so the merged heads made a demo step 0.41 s against 0.58 s
    (AMD EPYC, 2 cores, fp32). The split's gradient is handed back in the conv's layout
    (``_GradInLayout``), which is what once made a split slow in channels_last.
    """

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.conv = small_init_(conv3x3(width, 2 * channels), HEAD_INIT_SCALE)

    def forward(self, h: Tensor) -> DiagonalGaussian:
        mu, log_sigma = _head_output(self.conv, h).chunk(2, dim=1)
        return DiagonalGaussian.from_raw(mu, log_sigma)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Checkpoints from before the merge hold a mean conv and a log-scale conv: stack them.
        for name in ("weight", "bias"):
            parts = [f"{prefix}mu.{name}", f"{prefix}log_sigma.{name}"]
            if all(key in state_dict for key in parts):
                state_dict[f"{prefix}conv.{name}"] = torch.cat([state_dict.pop(k) for k in parts])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
