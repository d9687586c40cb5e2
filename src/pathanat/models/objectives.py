"""Training objectives: the ELBOs of Table 3, KL annealing and balancing, lesion supervision.

All terms are in nats, float32, per sample. The KL of a group is summed over its elements:
- a standard-normal prior (every group of vae, z_0 of nvae): analytic KL[q || N(0, I)];
- a fitted unconditional prior N(m, s^2) in their place: analytic KL[q || N(m, s^2)];
- a residual posterior (l > 0 of nvae/nvmp/nvmp+): eq. 4, analytic;
- the VampPrior of z_0 (nvmp/nvmp+): one-sample Monte Carlo log q(z_0) - log p(z_0), z_0 the
  posterior sample of the pass (an unbiased estimate whose gradient reaches the encoder and the
  pseudo-inputs).
nvmp+ adds, for l >= 1, KL[p(z_l | z_<l) || (1/K) sum_k q_phi(z_l | u_k)], estimated with one fresh
reparameterised sample from p(z_l | z_<l); it is returned apart (``kl_extra``) since it is a
regulariser of Table 3's objective, not part of the bound on log p(x).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pathanat.models.distributions import (
    gaussian_log_likelihood,
    mc_kl_to_mixture,
    residual_kl,
    sum_per_sample,
)
from pathanat.models.outputs import HVAEOutput

# Cyclical annealing (Fu et al. 2019): within each cycle the weight rises linearly from its start
# value to 1 over this fraction of the cycle, then holds at 1 -- the fraction Fu et al. use, which
# leaves half of every cycle to optimise the full ELBO.
RISE_FRACTION = 0.5


@dataclass
class ELBOTerms:
    """Per-sample terms of one pass: log p(x | z) (B,), KL per group (B, L+1), nvmp+'s extra KL
    per group l = 1..L (B, L) or None, and the number of image dimensions per sample."""

    log_px: Tensor
    kl: Tensor
    kl_extra: Tensor | None
    dims: int

    @property
    def elbo(self) -> Tensor:
        """The evidence lower bound log p(x | z) - sum_l KL_l per sample (nats)."""
        return self.log_px - self.kl.sum(1)


def group_kl(out: HVAEOutput) -> Tensor:
    """Per-sample, per-group KL (B, L+1) of a forward pass, as Table 3 defines it for its kind."""
    columns = []
    for level, g in enumerate(out.groups):
        if level == 0 and out.pseudo is not None:
            columns.append(mc_kl_to_mixture(g.posterior, g.z, out.pseudo[0]))
        elif g.prior is None:
            columns.append(sum_per_sample(g.posterior.kl_standard()))
        elif g.residual:
            columns.append(sum_per_sample(residual_kl(g.delta, g.prior)))
        else:
            columns.append(sum_per_sample(g.posterior.kl(g.prior)))
    return torch.stack(columns, dim=1)


def extra_kl(out: HVAEOutput, kind: str) -> Tensor | None:
    """nvmp+ only: KL[p(z_l | z_<l) || VampPrior_l] for l = 1..L, shape (B, L); else None."""
    if kind != "nvmp+":
        return None
    columns = []
    for level, g in enumerate(out.groups[1:], start=1):
        z = g.prior.sample()
        columns.append(mc_kl_to_mixture(g.prior, z, out.pseudo[level]))
    return torch.stack(columns, dim=1)


def elbo_terms(out: HVAEOutput, x: Tensor, kind: str) -> ELBOTerms:
    """The terms of Table 3's objective for a model of ``kind`` (``out``: its pass on ``x``)."""
    log_px = gaussian_log_likelihood(x, out.x_mean, out.x_log_scale)
    return ELBOTerms(log_px, group_kl(out), extra_kl(out, kind), dims=x[0].numel())


def group_sizes(out: HVAEOutput) -> Tensor:
    """Number of latent elements per sample in each group, (L+1,)."""
    return torch.tensor([float(g.z[0].numel()) for g in out.groups])


def kl_weight(step: int, cycle: int = 10_000, start: float = 2e-7) -> float:
    """Cyclical linear KL annealing: ``start`` at the beginning of each ``cycle`` steps, rising
    linearly to 1 over the first ``RISE_FRACTION`` of the cycle, then 1 until the cycle ends."""
    if cycle < 1 or step < 0:
        raise ValueError(f"kl_weight: expected cycle >= 1 and step >= 0, got {cycle}, {step}")
    position = (step % cycle) / (RISE_FRACTION * cycle)
    return start + (1.0 - start) * min(1.0, position)


def kl_balance_coefficients(kl: Tensor, sizes: Tensor) -> Tensor:
    """NVAE's KL balancing coefficients (L+1,), detached, with mean 1.

    Each group's coefficient is proportional to its batch-mean KL per latent element (its KL
    divided by its size) plus a floor of 0.01, as NVAE's author defines it (NVlabs/NVAE issue 26):
    a group that carries little per element is penalised less and so encouraged to carry more,
    while a group that carries much is pushed to hand information on. The seed paper's
    "proportional to the size of each latent layer" read literally (coefficient times size) did
    the opposite on our 96 x 112 grid: z_0's coefficient was 250x below z_4's, and the coarse
    groups, which must hold the brain's shape, drifted from their priors while the KL weight was
    small (generation notes in docs/generation.md).
    """
    per_element = kl.detach().abs().mean(0) / sizes.to(kl.device) + 0.01
    return per_element / per_element.mean()


def soft_dice_loss(logits: Tensor, mask: Tensor, smooth: float = 1.0) -> Tensor:
    """Per-sample 1 - soft Dice between sigmoid(logits) and a binary mask."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = mask.float().flatten(1)
    return 1.0 - (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def supervision_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Per-sample lesion loss: pixel-mean binary cross-entropy plus soft Dice."""
    if logits.shape != mask.shape:
        raise ValueError(
            f"supervision: logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ"
        )
    bce = F.binary_cross_entropy_with_logits(logits.float(), mask.float(), reduction="none")
    return bce.flatten(1).mean(1) + soft_dice_loss(logits, mask)


@dataclass
class Loss:
    """The scalar to minimise and its parts (batch means, for logging)."""

    loss: Tensor
    nll_per_dim: Tensor
    kl_per_dim: Tensor
    kl_extra_per_dim: Tensor
    supervision: Tensor
    coefficients: Tensor


def training_loss(
    terms: ELBOTerms,
    sizes: Tensor,
    beta: float,
    balance: bool = True,
    seg_logits: Tensor | None = None,
    mask: Tensor | None = None,
    supervision_weight: float = 1.0,
    kl_scale: float | Sequence[float] = 1.0,
) -> Loss:
    """``mean_b[(-log p(x|z) + beta * sum_l s_l (c_l KL_l + KLextra_l)) / D]
    + lambda * mean_b[BCE + Dice]``, with ``beta`` the annealed KL weight (at most 1) and ``s_l``
    the ``kl_scale`` it reaches, one for every group or one per group (1: the ELBO).

    Dividing by D (pixels x channels) makes the loss scale independent of the image size and
    comparable with the per-pixel supervision loss, so lambda = 1 weighs them evenly. The KL
    balancing coefficients c_l apply while ``beta < 1`` and ``balance``; otherwise c_l = 1. nvmp+'s
    extra KL is annealed with the same beta but not balanced.
    """
    if balance and beta < 1.0:
        coefficients = kl_balance_coefficients(terms.kl, sizes)
    else:
        coefficients = torch.ones(terms.kl.shape[1], device=terms.kl.device)
    scale = torch.as_tensor(kl_scale, dtype=terms.kl.dtype, device=terms.kl.device)
    if scale.ndim == 1 and scale.shape[0] != terms.kl.shape[1]:
        raise ValueError(f"training_loss: kl_scale has {scale.shape[0]} values for "
                         f"{terms.kl.shape[1]} groups")
    nll = -terms.log_px
    kl = (terms.kl * coefficients * scale).sum(1)
    extra = extra_scaled = torch.zeros_like(nll)
    if terms.kl_extra is not None:  # groups 1..L
        extra = terms.kl_extra.sum(1)
        extra_scaled = (terms.kl_extra * (scale[1:] if scale.ndim else scale)).sum(1)
    per_sample = (nll + beta * (kl + extra_scaled)) / terms.dims
    supervision = torch.zeros((), device=nll.device)
    if seg_logits is not None and mask is not None:
        supervision = supervision_loss(seg_logits, mask).mean()
    elif (seg_logits is None) != (mask is None):
        raise ValueError("training_loss: supervision needs both seg_logits and mask")
    return Loss(
        loss=per_sample.mean() + supervision_weight * supervision,
        nll_per_dim=nll.mean().detach() / terms.dims,
        kl_per_dim=terms.kl.sum(1).mean().detach() / terms.dims,
        kl_extra_per_dim=extra.mean().detach() / terms.dims,
        supervision=supervision.detach(),
        coefficients=coefficients,
    )

