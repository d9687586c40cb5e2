"""The four structured-prior hierarchical VAEs (vae, nvae, nvmp, nvmp+): the network (hvae.py),
its config, distributions, priors and heads, the objective of Table 3 (objectives.py), and
latent edits (edit.py)."""

from pathanat.models.config import KIND_NAMES, KINDS, VAMPPRIOR_KINDS, HVAEConfig
from pathanat.models.distributions import (
    DiagonalGaussian,
    gaussian_log_likelihood,
    mc_kl_to_mixture,
    mixture_log_prob,
    residual_kl,
    residual_posterior,
)
from pathanat.models.heads import SegmentationHead
from pathanat.models.hvae import HierarchicalVAE
from pathanat.models.outputs import Encoding, Generated, Group, HVAEOutput

__all__ = [
    "KINDS",
    "KIND_NAMES",
    "VAMPPRIOR_KINDS",
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
