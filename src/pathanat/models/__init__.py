"""The four structured-prior hierarchical VAEs (vae, nvae, nvmp, nvmp+) and their distributions."""

from pathanat.models.distributions import (
    DiagonalGaussian,
    gaussian_log_likelihood,
    mc_kl_to_mixture,
    mixture_log_prob,
    residual_kl,
    residual_posterior,
)
from pathanat.models.heads import SegmentationHead
from pathanat.models.hvae import (
    KINDS,
    Encoding,
    Generated,
    Group,
    HierarchicalVAE,
    HVAEConfig,
    HVAEOutput,
)

__all__ = [
    "KINDS",
    "DiagonalGaussian",
    "Encoding",
    "Generated",
    "Group",
    "HVAEConfig",
    "HVAEOutput",
    "HierarchicalVAE",
    "SegmentationHead",
    "gaussian_log_likelihood",
    "mc_kl_to_mixture",
    "mixture_log_prob",
    "residual_kl",
    "residual_posterior",
]
