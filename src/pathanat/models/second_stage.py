"""A second-stage prior over every group's standardised residuals, fitted after training to where
the training posteriors put them (ex-post density estimation, as in two-stage VAEs and RAE).

Why: the model's own priors draw each latent element independently given the groups above, and
on the phantom the top groups carry almost nothing, so the brain's layout -- which lives in z_3
-- is drawn as independent noise around one mean brain (docs/generation.md, "Fifth round"). A
density fitted to the training codes couples the elements, so a draw is a coherent layout.
Residuals r_l = (z_l - mu_l) / sig_l are modelled rather than values, and decoded top-down through
the model's priors (``HierarchicalVAE.from_residuals``), so each group still follows the context
drawn above it; where a prior is fixed (vae, z_0 of the VampPrior kinds) residual and value
coincide.

The density: the codes' first ``MIXTURE_DIMS`` principal directions (SVD of the N centred
codes), and on those coordinates a Gaussian mixture of full-covariance components (scikit-learn's
EM), one per ``CODES_PER_COMPONENT`` codes. A draw lies in the span of those directions. Measured
on the phantom (docs/generation.md, "Seventh round"): a single Gaussian blends slice levels into
double outlines; more components, each over fewer codes, bring the draws nearer the data (FID)
and nearer the training slices (the copy test of ``evaluation.novelty``), so the count per
component trades one against the other; drawing the trailing directions too, each an
independent Gaussian estimated from few codes, added incoherent blotches (FID 142 -> 133 without
them at 10 components).

The mixture spreads wider than the codes: its components, each over ~40 codes in 128 coordinates
and regularised, put draws farther from every training code than new slices' codes lie (1.13x on
the grid's nvae_ms_sup), and FID counts that as draws unlike the data. ``calibrated`` scales
every component's spread by the one factor at which the draws lie as near the training codes as
held-out codes do (validation slices'; docs/generation.md, "Sixteenth round"): by that yardstick
the draws are as new as new slices are, neither wider nor nearer to copies.

Conditioned on some groups of one slice (``draw_given``: per-layer variation, conditional
synthesis), the other groups are drawn from the mixture's posterior given them. A new slice's code
does not lie in the training codes' span, so the kept groups are treated as observed with
isotropic noise per group, whose variance is what the span misses of held-out training codes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from torch import Tensor

from pathanat.errors import InputError, checked_int

FIT_SLICES = 2048  # at most this many training slices (a fixed-seed subset beyond it)
MIXTURE_DIMS = 128
CODES_PER_COMPONENT = 40  # one mixture component per 40 training codes (at least one)
# added to each component's covariance, relative to the largest direction's variance: keeps a
# component of few codes from collapsing onto them
MIXTURE_REGULARISATION = 1e-3
CALIBRATION_DRAWS = 1024  # draws whose nearest-code distances set the spread


@dataclass
class SecondStagePrior:
    """mean + mixture coordinates @ directions, per concatenated code."""

    mean: Tensor  # (D,)
    directions: Tensor  # (q, D) orthonormal rows
    weights: Tensor  # (K,) mixture weights
    means: Tensor  # (K, q) component means
    cholesky: Tensor  # (K, q, q) lower Cholesky factors of the component covariances
    shapes: list[tuple[int, int, int]]  # each group's (C, h, w)
    noise: Tensor  # (G,) per group: variance per value of a held-out code off the span
    spread: float = 1.0  # the factor ``calibrated`` scaled the components' spread by
    # the last group's off-span detail model (``models.detail``): its weights and scale; None
    # draws that group in the span alone
    detail: dict | None = None

    def draw(self, n: int, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> list[Tensor]:
        """``n`` residual codes, one tensor (n, C, h, w) per group; ``temperature`` scales every
        deviation from a component's mean."""
        checked_int(n, "n", error=InputError)
        if not temperature >= 0:
            raise InputError(f"temperature: expected a number >= 0, got {temperature!r}")
        dtype = self.directions.dtype
        pick = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], 1, generator=generator, dtype=dtype)
        w = self.means[pick] + temperature * (self.cholesky[pick] @ eps)[..., 0]
        flat = self.mean + w @ self.directions
        return split_groups(flat, self.shapes)

    def draw_given(self, known: list[Tensor | None], n: int, temperature: float = 1.0,
                   generator: torch.Generator | None = None) -> list[Tensor]:
        """``n`` residual codes whose groups in ``known`` (one slice's, (C, h, w) each; None for a
        group to draw) are those given, the others drawn from the mixture conditioned on them.

        Coordinates w of the span, a mixture component's Gaussian; the kept values
        y = (mean + w @ directions)[kept] + noise. Per component the posterior of w is Gaussian
        and its evidence picks the component."""
        if len(known) != len(self.shapes):
            raise InputError(f"known: expected one entry per group ({len(self.shapes)}), "
                             f"got {len(known)}")
        for g, (k, shape) in enumerate(zip(known, self.shapes, strict=True)):
            if k is not None and tuple(k.shape) != shape:
                raise InputError(f"known[{g}]: expected shape {shape}, got {tuple(k.shape)}")
        if all(k is None for k in known):
            return self.draw(n, temperature, generator)
        checked_int(n, "n", error=InputError)
        if not temperature >= 0:
            raise InputError(f"temperature: expected a number >= 0, got {temperature!r}")
        dtype = self.directions.dtype
        kept = torch.cat([torch.full((int(np.prod(s)),), k is not None)
                          for k, s in zip(known, self.shapes, strict=True)])
        given = torch.cat([k.flatten().to(dtype) for k in known if k is not None])
        precision = torch.cat([torch.full((int(np.prod(s)),), 1 / float(v))
                               for k, s, v in zip(known, self.shapes, self.noise, strict=True)
                               if k is not None]).to(dtype)
        W = self.directions[:, kept].T  # (kept values, r)
        y = given - self.mean[kept]
        gram = W.T @ (W * precision[:, None])
        log_evidence, means, factors = [], [], []
        for mu, chol in zip(self.means, self.cholesky, strict=True):
            L = torch.linalg.cholesky(torch.cholesky_inverse(chol) + gram)
            a = y - W @ mu
            c = W.T @ (precision * a)
            shift = torch.cholesky_solve(c[:, None], L)[:, 0]
            means.append(mu + shift)
            factors.append(L)
            # log N(y; W m, W S W^T + D) by the determinant lemma and Woodbury's identity
            log_det = (-precision.log().sum() + 2 * chol.diagonal().log().sum()
                       + 2 * L.diagonal().log().sum())
            mahalanobis = (precision * a * a).sum() - c @ shift
            log_evidence.append(-0.5 * (log_det + mahalanobis))
        log_weights = self.weights.log() + torch.stack(log_evidence)
        pick = torch.multinomial(torch.softmax(log_weights, 0), n, replacement=True,
                                 generator=generator)
        eps = torch.randn(n, W.shape[1], 1, generator=generator, dtype=dtype)
        # L L^T is the posterior precision, so L^-T eps has the posterior covariance
        factor = torch.stack(factors)[pick]
        deviation = torch.linalg.solve_triangular(factor.transpose(1, 2), eps, upper=True)[..., 0]
        w = torch.stack(means)[pick] + temperature * deviation
        flat = self.mean + w @ self.directions
        flat[:, kept] = given
        return split_groups(flat, self.shapes)

    def coordinates(self, codes: Tensor) -> Tensor:
        """Flat codes (N, D) as coordinates (N, q) along the span's directions."""
        return (torch.as_tensor(codes, dtype=self.directions.dtype) - self.mean) @ self.directions.T

    def project(self, codes: Tensor) -> list[Tensor]:
        """Flat codes (N, D) projected onto the span, one tensor per group: the nearest that the
        density can draw, and so the fair held-out side of a copy test of its draws."""
        return split_groups(self.mean + self.coordinates(codes) @ self.directions, self.shapes)


def to_state(prior: SecondStagePrior) -> dict:
    """The prior as plain tensors and lists (``torch.save`` and ``weights_only`` loading)."""
    return {**asdict(prior), "shapes": [list(s) for s in prior.shapes]}


def from_state(state: dict) -> SecondStagePrior:
    return SecondStagePrior(**{**state, "shapes": [tuple(s) for s in state["shapes"]]})


def calibrated(prior: SecondStagePrior, codes: np.ndarray | Tensor,
               held_out: np.ndarray | Tensor, seed: int = 0) -> SecondStagePrior:
    """``prior`` (fitted to ``codes``, (N, D)) with every component's spread scaled by the factor
    at which the median distance from a draw to its nearest code equals that of the
    ``held_out`` codes (M, D), both in the span's coordinates.

    The factor is found by bisection on its logarithm in [1/64, 4], with one fixed set of
    ``CALIBRATION_DRAWS`` draws scaled along it; past either end, the end is kept."""
    fitted, new = (torch.as_tensor(np.asarray(c), dtype=prior.directions.dtype)
                   for c in (codes, held_out))
    size = prior.directions.shape[1]
    for name, c in (("codes", fitted), ("held_out", new)):
        if c.ndim != 2 or len(c) < 1 or c.shape[1] != size or not torch.isfinite(c).all():
            raise InputError(f"{name}: expected finite (N >= 1, {size}) codes, "
                             f"got shape {tuple(c.shape)}")
    pool = prior.coordinates(fitted)
    target = torch.cdist(prior.coordinates(new), pool).min(1).values.median()
    generator = torch.Generator().manual_seed(seed)
    pick = torch.multinomial(prior.weights, CALIBRATION_DRAWS, replacement=True,
                             generator=generator)
    eps = torch.randn(CALIBRATION_DRAWS, prior.means.shape[1], 1, generator=generator,
                      dtype=pool.dtype)
    centre, deviation = prior.means[pick], (prior.cholesky[pick] @ eps)[..., 0]

    def excess(log_factor: float) -> float:  # > 0: draws farther than new codes
        drawn = centre + float(np.exp(log_factor)) * deviation
        return float(torch.cdist(drawn, pool).min(1).values.median() - target)

    low, high = np.log(1 / 64), np.log(4.0)
    if excess(low) >= 0:
        factor = low
    elif excess(high) <= 0:
        factor = high
    else:
        for _ in range(30):
            middle = (low + high) / 2
            low, high = (middle, high) if excess(middle) < 0 else (low, middle)
        factor = (low + high) / 2
    spread = float(np.exp(factor))
    return replace(prior, cholesky=prior.cholesky * spread, spread=prior.spread * spread)


def split_groups(flat: Tensor, shapes: list[tuple[int, int, int]]) -> list[Tensor]:
    sizes = [int(np.prod(s)) for s in shapes]
    return [part.reshape(len(flat), *s).float()
            for part, s in zip(flat.split(sizes, dim=1), shapes, strict=True)]


def fit_second_stage(codes: np.ndarray | Tensor, shapes: list[tuple[int, int, int]],
                     dims: int = MIXTURE_DIMS, components: int | None = None,
                     seed: int = 0) -> SecondStagePrior:
    """The density of ``codes`` (N, D) described in the module docstring."""
    x = torch.as_tensor(np.asarray(codes), dtype=torch.float64)
    if x.ndim != 2 or len(x) < 2 or not torch.isfinite(x).all():
        raise InputError(f"codes: expected finite (N >= 2, D) values, got shape {tuple(x.shape)}")
    size = sum(int(np.prod(s)) for s in shapes)
    if x.shape[1] != size:
        raise InputError(f"codes: expected {size} values per row (the groups' sizes), "
                         f"got {x.shape[1]}")
    checked_int(dims, "dims", what="mixture coordinates", error=InputError)
    if components is None:
        components = max(1, len(x) // CODES_PER_COMPONENT)
    if not (isinstance(components, int) and 1 <= components <= len(x)):
        raise InputError(f"components: expected an integer in 1..{len(x)} (codes), "
                         f"got {components!r}")
    mean = x.mean(0)
    u, s, vt = principal_directions(x - mean, dims)
    mixture = GaussianMixture(
        components, covariance_type="full", random_state=seed,
        reg_covar=MIXTURE_REGULARISATION * float(s[0]) ** 2 / (len(x) - 1),
    ).fit((u * s).numpy())
    return SecondStagePrior(
        mean=mean, directions=vt, weights=torch.as_tensor(mixture.weights_),
        means=torch.as_tensor(mixture.means_),
        cholesky=torch.linalg.cholesky(torch.as_tensor(mixture.covariances_)),
        shapes=list(shapes), noise=off_span_noise(x, shapes, len(s)),
    )


def principal_directions(centred: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``count`` singular triplets of ``centred`` (N, D): u (N, q), s (q,), vt (q, D),
    q <= count, leaving out (numerically) zero directions.

    From the eigenvectors of the smaller Gram matrix (N x N or D x D): one product and a small
    eigh, where a thin SVD of a 2048 x 28644 code matrix took 53 s on 2 cores. Squaring the
    matrix costs precision only in directions 1e-8 below the first, far past those kept."""
    rows = centred.shape[0] <= centred.shape[1]
    gram = centred @ centred.T if rows else centred.T @ centred
    values, vectors = torch.linalg.eigh(gram)  # ascending
    s = values.flip(0).clamp_min(0).sqrt()
    keep = int((s > s[0] * 1e-6).sum()) if s[0] > 0 else 0
    s, vectors = s[:min(count, keep)], vectors.flip(1)[:, :min(count, keep)]
    if rows:
        return vectors, s, (vectors.T @ centred) / s[:, None]
    return (centred @ vectors) / s, s, vectors.T.contiguous()


def off_span_noise(x: Tensor, shapes: list[tuple[int, int, int]], dims: int,
                   every: int = 10) -> Tensor:
    """Per group, the mean square per value of held-out codes (every ``every``-th, at least one)
    off the span of the others' first ``dims`` principal directions: how far a new code lies from
    what the density can draw. A floor of 1e-6 of the group's variance keeps a code set that is
    exactly low-rank well-posed."""
    held = torch.arange(len(x)) % every == every - 1
    if not held.any():
        held[-1] = True
    fit = x[~held]
    centre = fit.mean(0)
    vt = principal_directions(fit - centre, dims)[2]
    off = x[held] - centre
    off = off - (off @ vt.T) @ vt
    sizes = [int(np.prod(s)) for s in shapes]
    variance = x.var(0)
    return torch.stack([
        torch.maximum(part.pow(2).mean(), 1e-6 * spread.mean().clamp_min(1e-12))
        for part, spread in zip(off.split(sizes, 1), variance.split(sizes), strict=True)
    ])


@torch.no_grad()
def fit_model_second_stage(model, images: np.ndarray, held_out: np.ndarray, batch_size: int = 64,
                           seed: int = 0) -> SecondStagePrior:
    """The second-stage prior of ``model`` (a HierarchicalVAE) on training slices (N, H, W): the
    density of the posterior-mean residuals of every group, of at most ``FIT_SLICES`` of them,
    ``calibrated`` against those of the ``held_out`` slices (M, H, W; at most ``FIT_SLICES``)."""
    codes, shapes = model_codes(model, at_most(images, seed), batch_size)
    return calibrated(fit_second_stage(codes, shapes, seed=seed), codes,
                      model_codes(model, at_most(held_out, seed), batch_size)[0], seed)


def at_most(images: np.ndarray, seed: int) -> np.ndarray:
    """``images``, or a fixed-seed subset of ``FIT_SLICES`` of them (a memory-mapped split is
    read only where picked)."""
    if len(images) <= FIT_SLICES:
        return images
    return images[np.sort(np.random.default_rng(seed).choice(len(images), FIT_SLICES,
                                                             replace=False))]


@torch.no_grad()
def model_codes(model, images: np.ndarray,
                batch_size: int = 64) -> tuple[Tensor, list[tuple[int, int, int]]]:
    """The flat posterior-mean residual codes (N, D) of ``images`` (N, H, W), and each group's
    (C, h, w)."""
    rows = []
    for start in range(0, len(images), batch_size):
        x = torch.tensor(np.asarray(images[start:start + batch_size], dtype=np.float32))[:, None]
        enc = model.encode(x)
        rows.append(torch.cat([r.flatten(1) for r in enc.residuals], 1).double())
    return torch.cat(rows), [tuple(r.shape[1:]) for r in enc.residuals]
