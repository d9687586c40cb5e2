"""What the model's passes return: the latent groups of a pass through the posterior
(:class:`Group`, :class:`HVAEOutput`), a subject's code (:class:`Encoding`), and images decoded
from latents (:class:`Generated`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pathanat.models.distributions import DiagonalGaussian


@dataclass
class Group:
    """One latent group of a top-down pass.

    ``prior`` is None where it is fixed rather than computed: N(0, I), or the VampPrior for z_0
    of nvmp/nvmp+ (whose components are in the pass's ``pseudo``). ``delta`` is the encoder's
    Gaussian N(dmu_l, dsig_l); ``residual``: the posterior is built from ``prior`` and delta (the
    residual kinds at l > 0), so its KL is eq. 4; else the posterior is the delta itself (also
    under a fitted unconditional prior, which follows the posteriors rather than moving them) or,
    under a recentred prior, built from the learned prior that ``prior`` recentres.
    """

    z: Tensor
    posterior: DiagonalGaussian
    delta: DiagonalGaussian
    prior: DiagonalGaussian | None
    residual: bool


@dataclass
class HVAEOutput:
    """One stochastic pass x -> q(z | x) -> p(x | z); cropped to the input's H x W."""

    x_mean: Tensor
    x_log_scale: Tensor
    groups: list[Group]
    # q_phi(z_l | u_k) for every group l, each with batch K; None for kinds without pseudo-inputs.
    pseudo: list[DiagonalGaussian] | None
    seg_logits: Tensor | None = None


@dataclass
class Encoding:
    """A subject's latent code: posterior means, taken top-down (z_l | posterior means above).

    ``residuals[l]`` is (z_l - mu_l) / sig_l, the mean in units of its own prior p(z_l | z_<l) --
    equal to ``z[l]`` where the prior is fixed (N(0, I) or the VampPrior).
    """

    z: list[Tensor]
    residuals: list[Tensor]
    posteriors: list[DiagonalGaussian]
    priors: list[DiagonalGaussian | None]
    input_size: tuple[int, int]


@dataclass
class Generated:
    """Images from given latents: the likelihood's mean and log-scale, and the latents used."""

    x_mean: Tensor
    x_log_scale: Tensor
    z: list[Tensor]
    seg_logits: Tensor | None = None
