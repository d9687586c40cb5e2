"""Diagonal Gaussians over spatial latent groups, their KLs, and the VampPrior mixture density.

Everything here runs in float32, whatever autocast does to the network around it: the network's
raw head outputs are cast up (``.float()``) before they are bounded, so KLs, log-densities and
their gradients do not suffer bf16's 8-bit mantissa (a log-density summed over 20 000 latent
elements would lose every digit of interest in bf16).

Shapes: a latent group is ``(B, C, H, W)``. "Per element" results keep that shape; "per sample"
results are summed over ``C, H, W`` and have shape ``(B,)`` -- a group's density is the product
over its elements, since all elements of one group are conditionally independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Means and log-scales pass through bound * tanh(x / bound): identity near 0, smooth, and bounded,
# so one extreme activation cannot produce an inf KL (NVAE bounds both the same way). The bound on
# the log-scale is also sigma's floor: a head emits sigma >= exp(-5) ~ 6.7e-3, and a residual
# posterior (a product of two bounded scales) sigma >= exp(-10) ~ 4.5e-5. Keeping the floor inside
# log_sigma (not added to sigma) keeps sampling, log-densities and eq. 4 exactly consistent.
MEAN_BOUND = 5.0
LOG_SCALE_BOUND = 5.0
_LOG_2PI = math.log(2.0 * math.pi)


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """``bound * tanh(x / bound)``: a smooth clamp into ``(-bound, bound)``."""
    return bound * torch.tanh(x / bound)


def sum_per_sample(x: Tensor) -> Tensor:
    """Sum every dimension but the first: per-element values -> one value per sample.

    A reduction over dims, not ``flatten(1).sum(1)``: flattening a channels_last tensor copies it
    and sends the gradient back in the default layout, slowing every conv behind it.
    """
    return x.sum(dim=tuple(range(1, x.ndim)))


class DiagonalGaussian:
    """N(mu, sigma^2) with independent elements; ``mu`` and ``log_sigma`` are float32 tensors.

    Built with :meth:`from_raw` (bounding a network's outputs) or directly from values that are
    already bounded (e.g. the product of a prior and a residual scale).
    """

    def __init__(self, mu: Tensor, log_sigma: Tensor) -> None:
        self.mu = mu
        self.log_sigma = log_sigma

    @classmethod
    def from_raw(cls, raw_mu: Tensor, raw_log_sigma: Tensor) -> DiagonalGaussian:
        """Bound a head's raw outputs (any dtype) into a float32 Gaussian."""
        mu = soft_clamp(raw_mu.float(), MEAN_BOUND)
        log_sigma = soft_clamp(raw_log_sigma.float(), LOG_SCALE_BOUND)
        return cls(mu, log_sigma)

    @classmethod
    def standard(cls, like: Tensor) -> DiagonalGaussian:
        """N(0, I) with the shape of ``like``."""
        zeros = torch.zeros_like(like, dtype=torch.float32)
        return cls(zeros, zeros)

    @property
    def sigma(self) -> Tensor:
        return self.log_sigma.exp()

    def sample(self, temperature: float = 1.0) -> Tensor:
        """A reparameterised sample ``mu + temperature * sigma * eps``."""
        return self.mu + temperature * self.sigma * torch.randn_like(self.mu)

    def standardise(self, z: Tensor) -> Tensor:
        """``(z - mu) / sigma``: the value of ``z`` in this Gaussian's own units."""
        return (z.float() - self.mu) / self.sigma

    def unstandardise(self, eps: Tensor) -> Tensor:
        """Inverse of :meth:`standardise`."""
        return self.mu + self.sigma * eps

    def log_prob(self, z: Tensor) -> Tensor:
        """Per-element log-density of ``z``."""
        return -0.5 * (self.standardise(z) ** 2 + _LOG_2PI) - self.log_sigma

    def kl(self, other: DiagonalGaussian) -> Tensor:
        """Per-element analytic KL[self || other]."""
        log_ratio = self.log_sigma - other.log_sigma
        mean_term = ((self.mu - other.mu) / other.sigma) ** 2
        return 0.5 * ((2 * log_ratio).exp() + mean_term - 1.0) - log_ratio

    def kl_standard(self) -> Tensor:
        """Per-element analytic KL[self || N(0, I)]."""
        return 0.5 * ((2 * self.log_sigma).exp() + self.mu**2 - 1.0) - self.log_sigma

    def expand_batch(self, repeats: int) -> DiagonalGaussian:
        """Repeat along the batch: sample s of image b lands at row ``s * B + b``."""
        return DiagonalGaussian(
            self.mu.repeat(repeats, 1, 1, 1), self.log_sigma.repeat(repeats, 1, 1, 1)
        )


def residual_kl(delta: DiagonalGaussian, prior: DiagonalGaussian) -> Tensor:
    """Per-element eq. 4: KL[N(mu + dmu, sigma * dsigma) || N(mu, sigma)].

    ``= 0.5 * (dmu^2 / sigma^2 + dsigma^2 - log dsigma^2 - 1)``; the prior mean cancels, so it is
    computed from the deltas directly rather than by subtracting two nearly equal means.
    (The paper prints ``- log sigma^2``; the derivation gives ``- log dsigma^2``.)
    """
    log_dsigma = delta.log_sigma
    return 0.5 * ((delta.mu / prior.sigma) ** 2 + (2 * log_dsigma).exp() - 2 * log_dsigma - 1.0)


def residual_posterior(prior: DiagonalGaussian, delta: DiagonalGaussian) -> DiagonalGaussian:
    """N(mu + dmu, sigma * dsigma): the residual posterior of eqs. 3a and 4.

    Both log-scales are bounded, so the product's log-scale lies in [-2 * bound, 2 * bound].
    """
    return DiagonalGaussian(prior.mu + delta.mu, prior.log_sigma + delta.log_sigma)


def mixture_log_prob(z: Tensor, components: DiagonalGaussian) -> Tensor:
    """Per-sample log-density of ``z`` (B, C, H, W) under the uniform mixture of K components.

    ``components`` holds K Gaussians of one group, shape (K, C, H, W); each component's density of
    a whole group is the product over its elements, then ``log (1/K) sum_k`` by logsumexp.
    Memory is B * K * C * H * W floats; callers chunk B when that is large.
    """
    mu, log_sigma = components.mu.unsqueeze(0), components.log_sigma.unsqueeze(0)  # (1,K,C,H,W)
    diff = (z.float().unsqueeze(1) - mu) * torch.exp(-log_sigma)  # (B, K, C, H, W)
    per_element = -0.5 * (diff**2 + _LOG_2PI) - log_sigma
    per_component = per_element.sum(dim=(2, 3, 4))  # (B, K)
    return torch.logsumexp(per_component, dim=1) - math.log(components.mu.shape[0])


def mc_kl_to_mixture(q: DiagonalGaussian, z: Tensor, components: DiagonalGaussian) -> Tensor:
    """Per-sample one-sample Monte Carlo KL[q || mixture]: ``log q(z) - log mixture(z)``, z ~ q."""
    return sum_per_sample(q.log_prob(z)) - mixture_log_prob(z, components)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Per-sample log N(x | mean, exp(log_scale)^2) in nats, summed over channels and pixels."""
    return sum_per_sample(DiagonalGaussian(mean.float(), log_scale.float()).log_prob(x))


@dataclass(frozen=True)
class Bins:
    """``levels`` equal bins over ``[low, high]`` of standardised intensity, the two edge bins
    open to -inf and +inf: the discretisation under which a likelihood is a probability.

    A continuous density on standardised slices whose background is one constant value is
    unbounded (a model gains "likelihood" by shrinking its scale there), so a continuous NLL can
    fall below 0 bits per dimension and ranks background modelling, not brains. The probability of
    a pixel's bin is at most 1: a code length, >= 0 bits, comparable across models (NVAE and
    VDVAE report bits/dim of 8-bit data the same way).
    """

    low: float = -4.0
    high: float = 4.0
    levels: int = 256

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"Bins: expected finite low < high, got {self.low}, {self.high}")
        if not (isinstance(self.levels, int) and self.levels >= 2):
            raise ValueError(f"Bins: expected levels >= 2, got {self.levels!r}")

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.levels

    def edges(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Lower and upper edge of the bin each value of ``x`` falls in (+-inf at the ends)."""
        index = torch.floor((x - self.low) / self.width).clamp(0, self.levels - 1)
        lower = torch.where(index > 0, self.low + index * self.width, -math.inf)
        upper = torch.where(index < self.levels - 1, self.low + (index + 1) * self.width, math.inf)
        return lower, upper


def log_interval_probability(lower: Tensor, upper: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) of standard-normal bounds, stable in both tails: an interval
    above 0 is mirrored below it, where the normal CDF keeps its digits."""
    mirror = (lower + upper) > 0
    lo = torch.where(mirror, -upper, lower)
    hi = torch.where(mirror, -lower, upper)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))


def discretized_gaussian_log_probs(
    x: Tensor, mean: Tensor, log_scale: Tensor, bins: Bins
) -> Tensor:
    """Per-pixel log P(bin of x) under N(mean, exp(log_scale)^2), float64, the shape of ``x``."""
    mean, log_scale = mean.double(), log_scale.double()
    lower, upper = bins.edges(x.double())
    inv_scale = torch.exp(-log_scale)
    return log_interval_probability((lower - mean) * inv_scale, (upper - mean) * inv_scale)
