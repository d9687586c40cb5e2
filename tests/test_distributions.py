"""Diagonal Gaussians, eq. 4's residual KL and the VampPrior mixture against independent truths."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm

from pathanat.models.distributions import (
    LOG_SCALE_BOUND,
    MEAN_BOUND,
    Bins,
    DiagonalGaussian,
    discretized_gaussian_log_probs,
    mc_kl_to_mixture,
    mixture_log_prob,
    residual_kl,
    residual_posterior,
    soft_clamp,
    sum_per_sample,
)


def _gaussian(shape, seed, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    log_sigma = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return DiagonalGaussian(mu, log_sigma)


def _mc_kl(q: DiagonalGaussian, p: DiagonalGaussian, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element Monte Carlo KL[q || p] and its standard error from n samples of q."""
    torch.manual_seed(0)
    z = q.mu + q.sigma * torch.randn((n, *q.mu.shape), dtype=torch.float64)
    log_ratio = norm.logpdf(z.numpy(), q.mu.numpy(), q.sigma.numpy()) - norm.logpdf(
        z.numpy(), p.mu.numpy(), p.sigma.numpy()
    )
    return torch.from_numpy(log_ratio.mean(0)), torch.from_numpy(log_ratio.std(0) / math.sqrt(n))


def test_analytic_kl_matches_monte_carlo():
    q, p = _gaussian((2, 3, 4), 1), _gaussian((2, 3, 4), 2)
    estimate, stderr = _mc_kl(q, p, 200_000)
    analytic = q.kl(p)
    assert torch.all((analytic - estimate).abs() < 5 * stderr + 1e-4)
    zero = DiagonalGaussian(torch.zeros_like(q.mu), torch.zeros_like(q.mu))
    assert torch.allclose(q.kl_standard(), q.kl(zero))


def test_residual_kl_eq4_matches_monte_carlo():
    prior, delta = _gaussian((2, 3, 4), 3), _gaussian((2, 3, 4), 4, scale=0.4)
    q = residual_posterior(prior, delta)
    # q really is N(mu + dmu, sigma * dsigma)
    assert torch.allclose(q.mu, prior.mu + delta.mu)
    assert torch.allclose(q.sigma, prior.sigma * delta.sigma)
    estimate, stderr = _mc_kl(q, prior, 200_000)
    eq4 = residual_kl(delta, prior)
    assert torch.all((eq4 - estimate).abs() < 5 * stderr + 1e-4)
    assert torch.allclose(eq4, q.kl(prior))


def test_log_prob_matches_scipy():
    q = _gaussian((3, 2, 5, 4), 5)
    z = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    expected = norm.logpdf(z.numpy(), q.mu.numpy(), q.sigma.numpy())
    np.testing.assert_allclose(q.log_prob(z).double().numpy(), expected, rtol=1e-5)


def test_mixture_log_prob_equals_brute_force_loop():
    components = _gaussian((5, 2, 3, 4), 6)  # K = 5 components of a (2, 3, 4) group
    z = torch.randn(4, 2, 3, 4, dtype=torch.float64)
    got = mixture_log_prob(z, components).numpy()
    mu, sigma = components.mu.numpy(), components.sigma.numpy()
    for b in range(4):
        per_component = [norm.logpdf(z[b].numpy(), mu[k], sigma[k]).sum() for k in range(5)]
        assert got[b] == pytest.approx(logsumexp(per_component) - math.log(5), rel=1e-6)


def test_mc_kl_to_single_component_mixture_is_unbiased():
    """With K = 1 the mixture is one Gaussian, so the MC estimate averages to the analytic KL."""
    q, p = _gaussian((1, 2, 2, 3), 7), _gaussian((1, 2, 2, 3), 8)
    torch.manual_seed(1)
    n = 20_000
    z = q.expand_batch(n).sample()
    estimate = mc_kl_to_mixture(q.expand_batch(n), z, p)
    stderr = estimate.std() / math.sqrt(n)
    assert abs(estimate.mean() - sum_per_sample(q.kl(p))[0]) < 5 * stderr


def test_bounded_parameters_keep_kl_finite_for_extreme_inputs():
    raw = torch.tensor([[-1e30, -1e4, 0.0, 1e4, 1e30]]).view(1, 1, 1, 5)
    q = DiagonalGaussian.from_raw(raw, raw)
    p = DiagonalGaussian.from_raw(-raw, -raw)
    assert q.mu.abs().max() <= MEAN_BOUND and q.log_sigma.abs().max() <= LOG_SCALE_BOUND
    for value in (q.kl(p), q.kl_standard(), residual_kl(q, p), q.log_prob(q.sample())):
        assert torch.isfinite(value).all()
    assert soft_clamp(torch.tensor(0.3), 5.0) == pytest.approx(0.3, rel=2e-3)


def test_float32_under_bf16_input():
    raw = torch.randn(2, 2, 3, 3, dtype=torch.bfloat16)
    q = DiagonalGaussian.from_raw(raw, raw)
    assert q.mu.dtype == torch.float32 and q.log_sigma.dtype == torch.float32


def test_binned_gaussian_probabilities_match_scipy_and_sum_to_one():
    bins = Bins(-4.0, 4.0, levels=256)
    g = torch.Generator().manual_seed(3)
    mean = 3.0 * torch.randn(200, generator=g, dtype=torch.float64)
    log_scale = -4.0 + 6.0 * torch.rand(200, generator=g, dtype=torch.float64)
    # values inside, on edges, beyond both ends, and far into the tails of their Gaussian
    x = torch.cat([8.0 * torch.rand(150, generator=g, dtype=torch.float64) - 4.0,
                   torch.tensor([-4.0, 4.0, -4.0 + bins.width, -9.0, 9.0, 0.0],
                                dtype=torch.float64),
                   torch.full((44,), 3.99, dtype=torch.float64)])
    got = discretized_gaussian_log_probs(x, mean, log_scale, bins).numpy()
    index = np.clip(np.floor((x.numpy() + 4.0) / bins.width), 0, 255)
    lower = np.where(index > 0, -4.0 + index * bins.width, -np.inf)
    upper = np.where(index < 255, -4.0 + (index + 1) * bins.width, np.inf)
    import mpmath

    mpmath.mp.dps = 50

    def probability(lo, hi, mu, ls):
        a, b = ((mpmath.mpf(v) - mpmath.mpf(mu)) / mpmath.exp(mpmath.mpf(ls)) if np.isfinite(v)
                else mpmath.mpf(v) for v in (lo, hi))
        if a + b > 0:  # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): in the upper tail both CDFs are ~1
            a, b = -b, -a
        return mpmath.ncdf(b) - mpmath.ncdf(a)

    expected = np.array([float(mpmath.log(probability(*row))) for row
                         in zip(lower, upper, mean.numpy(), log_scale.numpy(), strict=True)])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert (got <= 0).all()
    # every bin of one Gaussian, one value per bin (the bin centres): probabilities sum to 1
    centres = torch.tensor(-4.0 + (np.arange(256) + 0.5) * bins.width)
    for mu, ls in ((0.3, -3.5), (-3.9, 0.0), (5.0, 1.0)):
        p = discretized_gaussian_log_probs(centres, torch.tensor(mu), torch.tensor(ls), bins)
        assert float(p.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def test_bins_reject_an_empty_window():
    with pytest.raises(ValueError, match="low < high"):
        Bins(1.0, 1.0)
    with pytest.raises(ValueError, match="levels >= 2"):
        Bins(levels=1)
