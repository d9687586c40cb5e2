"""Editing a subject's latent code: keep some groups and redraw the others from the prior
(:func:`resample`), or take some groups from one subject and the rest from another (:func:`mix`).
Both are one top-down pass of the model (:meth:`HierarchicalVAE.generate`) whose choice of each
z_l is made here; the synthesis figures and the counterfactuals are built from them.

A kept group is kept in one of two modes. ``"value"``: it keeps its posterior mean z_l.
``"residual"``: it keeps its standardised residual r_l = (z_l - mu_l) / sig_l and is re-expressed
in the new context as mu'_l + sig'_l * r_l, so it moves with the groups above it (for the
residual kinds and l > 0; where the prior depends on nothing -- vae, z_0 -- the modes coincide).
"""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Literal

import torch
from torch import Tensor

from pathanat.errors import InputError, PathanatError
from pathanat.models.distributions import DiagonalGaussian
from pathanat.models.hvae import Encoding, Generated, HierarchicalVAE

ResampleMode = Literal["value", "residual"]
MODES: tuple[str, ...] = ("value", "residual")


def checked_groups(groups: Collection[int], last: int, name: str) -> list[int]:
    """``groups`` sorted and deduplicated when every one is a group index in 0..``last`` (an
    integer, not a bool); else a PathanatError naming ``name``."""
    values = list(groups)
    bad = [g for g in values if isinstance(g, bool) or not isinstance(g, numbers.Integral)
           or not 0 <= g <= last]
    if bad:
        raise PathanatError(f"{name}: expected group indices in 0..{last}, got {bad}")
    return sorted({int(g) for g in values})


def checked_mode(mode: str) -> str:
    if mode not in MODES:
        raise PathanatError(f"mode: expected 'value' or 'residual', got {mode!r}")
    return mode


def kept(enc: Encoding, level: int, prior: DiagonalGaussian | None, mode: str) -> Tensor:
    """z_level of a kept group of ``enc`` under the prior its new context gives."""
    if mode == "residual" and prior is not None:
        return prior.unstandardise(enc.residuals[level])
    return enc.z[level]


@torch.no_grad()
def resample(
    model: HierarchicalVAE,
    x: Tensor,
    keep: Collection[int],
    temperature: float = 1.0,
    mode: ResampleMode = "value",
) -> Generated:
    """Keep the groups in ``keep`` from x's posterior (means); draw the others from the prior,
    top-down, conditioned on what is kept and drawn above them (``mode``: see the module)."""
    keep = checked_groups(keep, model.config.num_groups - 1, "resample keep")
    mode = checked_mode(mode)
    enc = model.encode(x)
    shapes = model.group_shapes(enc.input_size)
    batch = x.shape[0]

    def choose(level: int, prior: DiagonalGaussian | None, state: Tensor) -> Tensor:
        if level in keep:
            return kept(enc, level, prior, mode)
        return model.draw_from_prior(level, prior, (batch, *shapes[level]), temperature)

    return model.generate(batch, enc.input_size, choose)


@torch.no_grad()
def mix(
    model: HierarchicalVAE,
    x_a: Tensor,
    x_b: Tensor,
    from_a: Collection[int],
    mode: ResampleMode = "value",
) -> Generated:
    """Groups in ``from_a`` from subject a's posterior means, the rest from subject b's
    (``mode``: see the module); x_a and x_b have the same shape."""
    from_a = checked_groups(from_a, model.config.num_groups - 1, "mix from_a")
    mode = checked_mode(mode)
    if x_a.shape != x_b.shape:
        raise InputError(f"mix: x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} differ")
    enc_a, enc_b = model.encode(x_a), model.encode(x_b)

    def choose(level: int, prior: DiagonalGaussian | None, state: Tensor) -> Tensor:
        return kept(enc_a if level in from_a else enc_b, level, prior, mode)

    return model.generate(x_a.shape[0], enc_a.input_size, choose)
