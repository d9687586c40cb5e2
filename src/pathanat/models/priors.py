"""Priors fitted to the posteriors during training rather than trained by gradient: the
unconditional :class:`FittedPrior` and the per-element correction :class:`RecentredPrior` of a
learned conditional prior (``model.unconditional_prior: fitted``, ``model.conditional_prior:
recentred``; why, in docs/generation.md). Both keep running moments in buffers, the M-step of EM
in closed form."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pathanat.errors import InputError
from pathanat.models.distributions import LOG_SCALE_BOUND, DiagonalGaussian

# A fitted prior's running moments keep this much of their value per training batch: an average
# over about the last 20 batches, so it follows posteriors that move quickly early in training.
FITTED_PRIOR_MOMENTUM = 0.95


class FittedPrior(nn.Module):
    """An unconditional N(m, s^2) per element, fitted to the posteriors rather than trained.

    Given posteriors N(mu_x, s_x^2), the Gaussian that maximises the ELBO (minimises the mean KL)
    has m = E[mu_x] and s^2 = E[mu_x^2 + s_x^2] - m^2: the M-step of EM, in closed form. ``update``
    keeps both moments as running averages over training batches (like batch norm's statistics;
    a buffer, so DDP broadcasts it and a checkpoint resumes it). A trained (m, log s) was measured
    instead: Adam moves a parameter by about lr per step, so at lr 1e-3 it had moved 0.13 of the
    0.7 it needed after 350 steps, and nvae drew no brains (docs/generation.md).
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.register_buffer("first", torch.zeros(1, *shape))  # N(0, I) until the first update
        self.register_buffer("second", torch.ones(1, *shape))

    def forward(self, batch: int) -> DiagonalGaussian:
        variance = (self.second - self.first**2).clamp_min(math.exp(-2 * LOG_SCALE_BOUND))
        log_sigma = 0.5 * variance.log()
        # a copy: ``update`` changes the buffers in place, after the pass that used this prior
        return DiagonalGaussian(
            self.first.clone().expand(batch, -1, -1, -1), log_sigma.expand(batch, -1, -1, -1)
        )

    @torch.no_grad()
    def update(self, posterior: DiagonalGaussian) -> None:
        """Move the moments towards the batch's: E[mu], E[mu^2 + sigma^2] over its images.

        A batch with a non-finite posterior (a step the module will skip) changes nothing."""
        mu, sigma = posterior.mu.float(), posterior.sigma.float()
        if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
            return
        keep = FITTED_PRIOR_MOMENTUM
        self.first.lerp_(mu.mean(0, keepdim=True), 1 - keep)
        self.second.lerp_((mu**2 + sigma**2).mean(0, keepdim=True), 1 - keep)


class RecentredPrior(nn.Module):
    """A conditional prior N(mu, sigma^2) from the decoder state, moved per element to where the
    posteriors are: N(mu + sigma m, sigma^2 v).

    In the learned prior's own units the posteriors' codes are e = (z - mu) / sigma ~ N(dmu /
    sigma, dsig^2); (m, v) are their mean and variance over training batches (running averages,
    buffers, as FittedPrior's): the ELBO-maximising per-element affine correction of the prior
    given the posteriors, its M-step. The posteriors stay built from the learned prior (eq. 3a), so
    moving (m, v) does not move them, and the KL is taken against the recentred prior. Why: under
    eq. 4 the KL gives the prior's mean no gradient, and after a short run the posterior codes of
    z_2 sat, on average over slices, 0.5 prior sigmas from the prior means in a pattern shared by
    every slice (64% of their mean square): the learned priors' draws decoded to blurred boxes,
    the recentred ones to brains (docs/generation.md).
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.register_buffer("first", torch.zeros(1, *shape))  # the identity until updated
        self.register_buffer("second", torch.ones(1, *shape))

    def _log_variance(self) -> Tensor:
        return (self.second - self.first**2).clamp_min(math.exp(-2 * LOG_SCALE_BOUND)).log()

    def forward(self, prior: DiagonalGaussian) -> DiagonalGaussian:
        # copies: ``update`` changes the buffers in place, after the pass that used this prior
        m, log_v = self.first.clone(), self._log_variance()
        return DiagonalGaussian(prior.mu + prior.sigma * m, prior.log_sigma + 0.5 * log_v)

    def learned(self, recentred: DiagonalGaussian) -> DiagonalGaussian:
        """The learned prior that ``forward`` made ``recentred`` from (the exact inverse)."""
        log_sigma = recentred.log_sigma - 0.5 * self._log_variance()
        return DiagonalGaussian(recentred.mu - log_sigma.exp() * self.first.clone(), log_sigma)

    @torch.no_grad()
    def update(self, delta: DiagonalGaussian, recentred: DiagonalGaussian) -> None:
        """Move (m, v) towards the batch's codes e = dmu / sigma, dsig (a batch with a non-finite
        value, a step the module will skip, changes nothing)."""
        e = delta.mu.float() / self.learned(recentred).sigma.float()
        spread = (2 * delta.log_sigma.float()).exp()
        if not (torch.isfinite(e).all() and torch.isfinite(spread).all()):
            return
        keep = FITTED_PRIOR_MOMENTUM
        self.first.lerp_(e.mean(0, keepdim=True), 1 - keep)
        self.second.lerp_((e**2 + spread).mean(0, keepdim=True), 1 - keep)


def check_fitted_size(level: int, moments: Tensor, h: Tensor) -> None:
    """Moments fitted per element (FittedPrior, RecentredPrior) hold only for the configured
    image size: another size has other elements."""
    if moments.shape[-2:] != h.shape[-2:]:
        raise InputError(
            f"z_{level} has a prior fitted at {tuple(moments.shape[-2:])} elements (the "
            f"configured image size); this input gives {tuple(h.shape[-2:])}"
        )
