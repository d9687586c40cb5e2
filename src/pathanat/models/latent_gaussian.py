"""A second-stage prior: one Gaussian over every group's standardised residuals, fitted after
training to where the training posteriors put them (ex-post density estimation, as in two-stage
VAEs and RAE).

Why: the model's own priors draw each latent element independently given the groups above, and
on the phantom the top groups carry almost nothing, so the brain's layout -- which lives in z_3
-- is drawn as independent noise around one mean brain (docs/generation.md, "Fifth round"). The
empirical covariance of the training residuals couples the elements, so a draw is a coherent
layout. Residuals r_l = (z_l - mu_l) / sig_l are modelled rather than values, and decoded top-down
through the model's priors (``HierarchicalVAE.from_residuals``), so each group still follows the
context drawn above it; where a prior is fixed (vae, z_0 of the VampPrior kinds) residual and
value coincide.

The Gaussian has the sample mean and the sample covariance of N training codes, stored as its
N principal directions scaled by their standard deviations (rank <= N - 1): exact, small enough
to fit in seconds on a CPU, and nothing is drawn outside the span of the training codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pathanat.errors import InputError

# at most this many training slices (a fixed-seed subset beyond it): the SVD of N x D codes
FIT_SLICES = 2048


@dataclass
class LatentGaussian:
    """N(mean, basis^T basis) over the concatenated residuals of every group."""

    mean: Tensor  # (D,)
    basis: Tensor  # (k, D): principal directions times their standard deviations
    shapes: list[tuple[int, int, int]]  # each group's (C, h, w)

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def draw(self, n: int, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> list[Tensor]:
        """``n`` residual codes, one tensor (n, C, h, w) per group; ``temperature`` scales the
        standard deviation of every direction."""
        if not (isinstance(n, int) and n >= 1):
            raise InputError(f"n: expected an integer >= 1, got {n!r}")
        if not temperature >= 0:
            raise InputError(f"temperature: expected a number >= 0, got {temperature!r}")
        c = torch.randn(n, self.rank, generator=generator, dtype=self.basis.dtype)
        flat = self.mean + temperature * c @ self.basis
        return split_groups(flat, self.shapes)


def split_groups(flat: Tensor, shapes: list[tuple[int, int, int]]) -> list[Tensor]:
    sizes = [int(np.prod(s)) for s in shapes]
    if flat.shape[1] != sum(sizes):
        raise InputError(f"codes: expected {sum(sizes)} values per row, got {flat.shape[1]}")
    return [part.reshape(len(flat), *s).float()
            for part, s in zip(flat.split(sizes, dim=1), shapes, strict=True)]


def fit_gaussian(codes: np.ndarray | Tensor, shapes: list[tuple[int, int, int]]) -> LatentGaussian:
    """The Gaussian with the sample mean and (unbiased) covariance of ``codes`` (N, D)."""
    x = torch.as_tensor(np.asarray(codes), dtype=torch.float64)
    if x.ndim != 2 or len(x) < 2 or not torch.isfinite(x).all():
        raise InputError(f"codes: expected finite (N >= 2, D) values, got shape {tuple(x.shape)}")
    size = sum(int(np.prod(s)) for s in shapes)
    if x.shape[1] != size:
        raise InputError(f"codes: expected {size} values per row (the groups' sizes), "
                         f"got {x.shape[1]}")
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    keep = s > s[0] * 1e-6 if s[0] > 0 else s > 0
    basis = (s[keep, None] / np.sqrt(len(x) - 1)) * vt[keep]
    return LatentGaussian(mean.float(), basis.float(), list(shapes))


@torch.no_grad()
def fit_latent_gaussian(model, images: np.ndarray, batch_size: int = 64,
                        seed: int = 0) -> LatentGaussian:
    """The second-stage prior of ``model`` (a HierarchicalVAE) on training slices (N, H, W):
    the posterior-mean residuals of every group, of at most ``FIT_SLICES`` of them."""
    if len(images) > FIT_SLICES:  # (a memory-mapped split is read only where picked)
        pick = np.sort(np.random.default_rng(seed).choice(len(images), FIT_SLICES, replace=False))
        images = images[pick]
    rows = []
    for start in range(0, len(images), batch_size):
        x = torch.tensor(np.asarray(images[start:start + batch_size], dtype=np.float32))[:, None]
        enc = model.encode(x)
        rows.append(torch.cat([r.flatten(1) for r in enc.residuals], 1).double())
    return fit_gaussian(torch.cat(rows), [tuple(r.shape[1:]) for r in enc.residuals])
