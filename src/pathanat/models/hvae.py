"""The multi-scale hierarchical VAE with four prior structures: vae, nvae, nvmp, nvmp+ (Table 2).

Groups are numbered top-down: z_0 is the coarsest (1/2^L of the padded input), z_L is at full
resolution; each has ``latent_channels`` channels. The four kinds share one encoder and one
decoder trunk, so their capacity is the same; they differ only in what a kind needs:

- ``vae``: q(z_l | x) = N(dmu_l(x), dsig_l(x)) and p(z_l) = N(0, I) for every l. The decoder
  consumes the latents top-down, but its state parameterises no distribution (it has no prior
  heads), so the posterior is a function of the encoder alone.
- ``nvae``: q(z_0 | x) = N(dmu_0, dsig_0), p(z_0) = N(0, I); for l > 0 the decoder state gives the
  prior p(z_l | z_<l) = N(mu_l, sig_l) and the posterior is the residual N(mu_l + dmu_l,
  sig_l * dsig_l).
- ``nvmp``: as nvae, with p(z_0) = (1/K) sum_k q(z_0 | u_k), u_k trainable pseudo-inputs.
- ``nvmp+``: as nvmp; its objective adds, for l >= 1, KL[p(z_l | z_<l) || (1/K) sum_k
  q_phi(z_l | u_k)] where q_phi(z_l | u_k) = N(dmu_l(u_k), dsig_l(u_k)) is the encoder's own
  Gaussian at scale l, made by the same heads that give the image's deltas (with a joint
  posterior, given u_k's own top-down pass; see below); nothing else is added.

The encoder's deltas (dmu_l, dsig_l) of groups l > 0 read the bottom-up features of the image
concatenated with the decoder state at that point (``posterior: joint``, the default), as NVAE's
and VDVAE's inference do: the posterior can then say what the prior got wrong, rather than a
fixed offset from it. ``posterior: encoder`` takes them from the image alone, the literal reading
of Table 2's dmu_phi(x); on the phantom it reconstructs but never learns a prior that generates
(0 of 64 prior samples brain-like after 400 steps, against 64 of 64 with ``joint``; the ablation
is in docs/generation.md), so it is kept only to show that. With ``joint``, q_phi(z_l | u_k) of
nvmp+ is u_k's own delta given u_k's own top-down pass (each group at its posterior mean), so
the K pseudo-inputs then run through the decoder too; nvmp needs only z_0's, which reads the
image alone in both forms. The vae has no decoder-state posterior: its q(z_l | x) is the
encoder's alone by definition.

Inputs of any H x W are padded (edge replication, bottom/right) to a multiple of 2^L and outputs
cropped back; the likelihood counts only the original pixels. Kinds with pseudo-inputs need the
padded input size to equal the padded ``image_size`` (the pseudo-inputs' shape), since their z_0
prior lives on that grid.

Speed: the model runs in the memory layout of its weights -- call
``model.to(memory_format=torch.channels_last)`` and run under
``torch.autocast("cpu", dtype=torch.bfloat16)`` for the fast path. The trunk's convs then run in
bf16, and so do the heads that emit latent distribution parameters, whose outputs are cast to fp32
before they are bounded; the likelihood head runs in fp32, and all densities and KLs are fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathanat.errors import ConfigError, InputError, PathanatError, checked_int
from pathanat.models.blocks import (
    conv1x1,
    conv3x3,
    downsample,
    residual_stack,
    small_init_,
    upsample,
)
from pathanat.models.distributions import (
    LOG_SCALE_BOUND,
    Bins,
    DiagonalGaussian,
    discretized_gaussian_log_probs,
    gaussian_log_likelihood,
    mixture_log_prob,
    residual_posterior,
    sum_per_sample,
)
from pathanat.models.heads import SegmentationHead

Kind = Literal["vae", "nvae", "nvmp", "nvmp+"]
KINDS: tuple[str, ...] = ("vae", "nvae", "nvmp", "nvmp+")
ResampleMode = Literal["value", "residual"]
Posterior = Literal["encoder", "joint"]
POSTERIORS: tuple[str, ...] = ("encoder", "joint")
UnconditionalPrior = Literal["standard", "fitted"]
UNCONDITIONAL_PRIORS: tuple[str, ...] = ("standard", "fitted")
ConditionalPrior = Literal["learned", "recentred"]
CONDITIONAL_PRIORS: tuple[str, ...] = ("learned", "recentred")

# log-scale of the pixel likelihood, smoothly bounded to (X_LOG_SCALE_MIN, X_LOG_SCALE_MAX) by a
# scaled sigmoid: sigma_x in (0.018, 7.4) on standardised intensities, starting at exp(-1) ~ 0.37.
# The floor is the stability knob: with a floor of exp(-5) per-pixel scales collapsed on a few
# pixels and a small shift of the mean then gave loss spikes of 100x (seen at lr 1e-3..2e-3);
# 0.018 standard deviations is still far below the error of any reconstruction we measure.
X_LOG_SCALE_MIN = -4.0
X_LOG_SCALE_MAX = 2.0
# Distribution heads start with weights scaled by this so a new model has posteriors near their
# priors and unit scales (small, finite KL at step 0).
HEAD_INIT_SCALE = 0.1
# A fitted prior's running moments keep this much of their value per training batch: an average
# over about the last 20 batches, so it follows posteriors that move quickly early in training.
FITTED_PRIOR_MOMENTUM = 0.95


@dataclass
class HVAEConfig:
    """Everything that defines a model; a checkpoint stores it, so a model can always be rebuilt.

    Defaults: the paper's hierarchy (L = 4, 5 groups of 2 channels, z_P = z_2). The paper gives no
    trunk size; the default is 32 channels at every scale and 2 residual cells per scale in each
    trunk (vae 377 k parameters, nvae 386 k, nvmp/nvmp+ 472 k with 8 pseudo-inputs of 96 x 112).
    ``widths`` and ``cells`` set them per scale: the packaged configs widen the coarse scales,
    where a conv costs 1/16 to 1/256 of one at full resolution, because a prior that generates
    needs capacity where the brain's shape is decided (docs/generation.md).
    K = 8 pseudo-inputs: all K go through the encoder every step, so with a batch of 16 they add
    half an encoder pass (about a sixth of a step); 8 modes cover the coarse cluster structure of
    a slice distribution (VampPrior's K = 500 was for MLP encoders of 28 x 28 digits).
    """

    kind: Kind = "nvae"
    in_channels: int = 1
    image_size: tuple[int, int] = (96, 112)
    levels: int = 4
    latent_channels: int = 2
    width: int = 32
    cells_per_scale: int = 2
    # per scale, top-down (z_0's scale first); None: ``width`` / ``cells_per_scale`` at every scale
    widths: tuple[int, ...] | None = None
    cells: tuple[int, ...] | None = None
    pseudo_inputs: int = 8
    z_p: int = 2
    supervised: bool = False
    posterior: Posterior = "joint"
    # the prior of the groups whose prior depends on nothing (every group of vae, z_0 of nvae):
    # "standard" N(0, I) as in the paper, or "fitted" N(m, s^2) per element, fitted to the
    # posteriors during training (FittedPrior), which lets those kinds generate
    # (docs/generation.md); nvmp/nvmp+ have no such group
    unconditional_prior: UnconditionalPrior = "standard"
    # the conditional priors p(z_l | z_<l), l > 0, of nvae/nvmp/nvmp+: "learned" as in the paper,
    # or "recentred": each moved per element to where the training posteriors are
    # (RecentredPrior), without which their draws decode to blurred boxes (docs/generation.md)
    conditional_prior: ConditionalPrior = "learned"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"model.kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.posterior not in POSTERIORS:
            raise ConfigError(
                f"model.posterior: expected one of {', '.join(POSTERIORS)}, got {self.posterior!r}"
            )
        if self.conditional_prior not in CONDITIONAL_PRIORS:
            raise ConfigError(
                f"model.conditional_prior: expected one of {', '.join(CONDITIONAL_PRIORS)}, "
                f"got {self.conditional_prior!r}"
            )
        if self.unconditional_prior not in UNCONDITIONAL_PRIORS:
            raise ConfigError(
                f"model.unconditional_prior: expected one of {', '.join(UNCONDITIONAL_PRIORS)}, "
                f"got {self.unconditional_prior!r}"
            )
        for key in ("in_channels", "levels", "latent_channels", "width", "pseudo_inputs"):
            value = getattr(self, key)
            checked_int(value, f"model.{key}", error=ConfigError)
        checked_int(self.cells_per_scale, "model.cells_per_scale", minimum=0, error=ConfigError)
        for key, low in (("widths", 1), ("cells", 0)):
            value = getattr(self, key)
            if value is None:
                continue
            if len(value) != self.levels + 1 or any(
                not isinstance(v, int) or isinstance(v, bool) or v < low for v in value
            ):
                raise ConfigError(
                    f"model.{key}: expected {self.levels + 1} integers >= {low} (one per scale, "
                    f"top-down), got {value!r}"
                )
            setattr(self, key, tuple(value))
        if not (0 <= self.z_p <= self.levels):
            raise ConfigError(
                f"model.z_p: expected a group index in 0..{self.levels} (levels), got {self.z_p!r}"
            )
        size = tuple(self.image_size)
        if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
            raise ConfigError(
                f"model.image_size: expected two positive integers [H, W], got {self.image_size!r}"
            )
        self.image_size = (int(size[0]), int(size[1]))

    @property
    def num_groups(self) -> int:
        return self.levels + 1

    @property
    def scale_widths(self) -> tuple[int, ...]:
        """Trunk width of every scale, top-down."""
        return self.widths or (self.width,) * self.num_groups

    @property
    def scale_cells(self) -> tuple[int, ...]:
        """Residual cells per trunk at every scale, top-down."""
        return self.cells or (self.cells_per_scale,) * self.num_groups

    @property
    def residual(self) -> bool:
        """Whether the decoder parameterises priors and residual posteriors for l > 0."""
        return self.kind != "vae"

    @property
    def joint(self) -> bool:
        """Whether the deltas of groups l > 0 read the decoder state as well as the image."""
        return self.residual and self.posterior == "joint"

    @property
    def fitted_prior_levels(self) -> tuple[int, ...]:
        """The groups whose unconditional prior is a FittedPrior (see unconditional_prior)."""
        if self.unconditional_prior != "fitted" or self.vamp:
            return ()
        return tuple(range(self.num_groups)) if self.kind == "vae" else (0,)

    @property
    def recentred_levels(self) -> tuple[int, ...]:
        """The groups whose conditional prior is a RecentredPrior (see conditional_prior)."""
        if self.conditional_prior != "recentred" or not self.residual:
            return ()
        return tuple(range(1, self.num_groups))

    @property
    def vamp(self) -> bool:
        """Whether p(z_0) is a VampPrior over trainable pseudo-inputs."""
        return self.kind in ("nvmp", "nvmp+")


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

    kind: str
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


def _fp32_conv(conv: nn.Conv2d, h: Tensor) -> Tensor:
    """Run ``conv`` in float32 even under autocast (the likelihood head: its mean must resolve
    pixel differences far below bf16's 3 significant digits for an honest NLL)."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        return _GradInLayout.apply(conv(h.float()))


class _GradInLayout(torch.autograd.Function):
    """Identity whose backward hands on the gradient in the forward tensor's memory layout.

    The KL and density code reduces and broadcasts, which leaves the gradient of a head's output
    in the default layout; a channels_last conv fed such a gradient converts layouts internally
    and its backward became the slowest op of the step. Copying the small (2-channel) gradient
    once is far cheaper.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if ctx.channels_last:
            return grad.contiguous(memory_format=torch.channels_last)
        return grad.contiguous()


def _head_output(conv: nn.Conv2d, h: Tensor) -> Tensor:
    """``conv(h)`` cast to float32, its gradient kept in the conv's layout."""
    return _GradInLayout.apply(conv(h)).float()


def _width_change(in_width: int, out_width: int) -> nn.Module:
    """A 1x1 conv between scales of different trunk widths; the identity where they agree."""
    return nn.Identity() if in_width == out_width else conv1x1(in_width, out_width)


class GaussianHead(nn.Module):
    """One 3x3 conv from a state to the raw (mean, log-scale) of a latent group, split in two.

    It runs in the trunk's precision (bf16 under autocast: a float32 copy of the full-resolution
    state per head would cost more than the head); its output is cast up to float32 before it is
    bounded. One conv of 2C outputs rather than two of C: in oneDNN a 3x3 conv's forward and
    backward cost about the same for 2 outputs as for 4 (40 vs 36 ms from 32 channels at
    16 x 96 x 112, channels_last), so the merged heads made a demo step 0.41 s against 0.58 s
    (AMD EPYC, 2 cores, fp32). The split's gradient is handed back in the conv's layout
    (``_GradInLayout``), which is what once made a split slow in channels_last.
    """

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.conv = small_init_(conv3x3(width, 2 * channels), HEAD_INIT_SCALE)

    def forward(self, h: Tensor) -> DiagonalGaussian:
        mu, log_sigma = _head_output(self.conv, h).chunk(2, dim=1)
        return DiagonalGaussian.from_raw(mu, log_sigma)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Checkpoints from before the merge hold a mean conv and a log-scale conv: stack them.
        for name in ("weight", "bias"):
            parts = [f"{prefix}mu.{name}", f"{prefix}log_sigma.{name}"]
            if all(key in state_dict for key in parts):
                state_dict[f"{prefix}conv.{name}"] = torch.cat([state_dict.pop(k) for k in parts])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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


def _check_fitted_size(level: int, moments: Tensor, h: Tensor) -> None:
    """Moments fitted per element (FittedPrior, RecentredPrior) hold only for the configured
    image size: another size has other elements."""
    if moments.shape[-2:] != h.shape[-2:]:
        raise InputError(
            f"z_{level} has a prior fitted at {tuple(moments.shape[-2:])} elements (the "
            f"configured image size); this input gives {tuple(h.shape[-2:])}"
        )


class Encoder(nn.Module):
    """Bottom-up trunk: full resolution -> 1/2^L, the features of every scale, and one head of
    (dmu_l, dsig_l) per scale.

    With ``posterior: joint`` the heads of groups l > 0 read the features concatenated with the
    decoder state at that point (NVAE's and VDVAE's inference), so they are applied in the
    top-down pass (:meth:`delta`), not here.
    """

    def __init__(self, config: HVAEConfig, residual_scale: float) -> None:
        super().__init__()
        widths, channels = config.scale_widths, config.latent_channels
        self.joint = config.joint
        self.stem = conv3x3(config.in_channels, widths[-1])
        # Index l = latent group l (0 coarsest); the pass runs l = L .. 0.
        self.stacks = nn.ModuleList(
            residual_stack(w, cells, residual_scale)
            for w, cells in zip(widths, config.scale_cells, strict=True)
        )
        # widen[l - 1] maps scale l's width to scale l-1's after downsampling
        self.widen = nn.ModuleList(
            _width_change(widths[level], widths[level - 1]) for level in range(1, len(widths))
        )
        self.heads = nn.ModuleList(
            GaussianHead(2 * w if self.joint and level > 0 else w, channels)
            for level, w in enumerate(widths)
        )

    def forward(self, x: Tensor, memory_format: torch.memory_format) -> list[Tensor]:
        """The features of every scale, indexed top-down (l = 0, the coarsest, first)."""
        # With one input channel both layouts look alike to conv, so the stem's output layout is
        # set explicitly; every later op keeps it.
        h = self.stem(x).contiguous(memory_format=memory_format)
        features: list[Tensor] = []
        for level in reversed(range(len(self.stacks))):
            h = self.stacks[level](h)
            features.append(h)
            if level > 0:
                h = self.widen[level - 1](downsample(h))
        return features[::-1]

    def delta(self, level: int, features: Tensor, state: Tensor) -> DiagonalGaussian:
        """N(dmu_l, dsig_l) of group ``level`` from its features (and the decoder state)."""
        if self.joint and level > 0:
            features = torch.cat([features, state.to(features.dtype)], dim=1)
        return self.heads[level](features)


class Decoder(nn.Module):
    """Top-down trunk: a learned constant at 1/2^L, each group injected by a 1x1 conv, then cells.

    For the residual kinds a head on the (upsampled) state gives the prior of groups l > 0.
    The groups of ``config.fitted_prior_levels`` have a FittedPrior of their shape in ``shapes``
    (the groups' shapes at the configured image size).
    """

    def __init__(
        self, config: HVAEConfig, residual_scale: float, shapes: list[tuple[int, int, int]]
    ) -> None:
        super().__init__()
        widths, channels = config.scale_widths, config.latent_channels
        self.start = nn.Parameter(torch.zeros(1, widths[0], 1, 1))
        self.z_in = nn.ModuleList(conv1x1(channels, w) for w in widths)
        self.stacks = nn.ModuleList(
            residual_stack(w, cells, residual_scale)
            for w, cells in zip(widths, config.scale_cells, strict=True)
        )
        # narrow[l - 1] maps scale l-1's width to scale l's after upsampling
        self.narrow = nn.ModuleList(
            _width_change(widths[level - 1], widths[level]) for level in range(1, len(widths))
        )
        # prior_heads[l - 1] gives p(z_l | z_<l) for l = 1..L; the vae has none.
        self.prior_heads = nn.ModuleList(
            GaussianHead(widths[level], channels)
            for level in range(1, len(widths) if config.residual else 1)
        )
        self.out = conv3x3(widths[-1], 2 * config.in_channels)
        self.fitted_priors = nn.ModuleDict(
            {str(level): FittedPrior(shapes[level]) for level in config.fitted_prior_levels}
        )
        self.recentred_priors = nn.ModuleDict(
            {str(level): RecentredPrior(shapes[level]) for level in config.recentred_levels}
        )

    def grow(self, level: int, h: Tensor) -> Tensor:
        """The state carried from scale ``level - 1`` up to scale ``level``."""
        return self.narrow[level - 1](upsample(h))

    def initial_state(
        self, batch: int, size: tuple[int, int], memory_format: torch.memory_format
    ) -> Tensor:
        return self.start.expand(batch, -1, *size).contiguous(memory_format=memory_format)

    def prior(self, level: int, h: Tensor) -> DiagonalGaussian | None:
        """p(z_level | z_<level) from the state (recentred where configured), the fitted
        unconditional prior, or None where the prior is fixed."""
        if str(level) in self.fitted_priors:
            fitted = self.fitted_priors[str(level)]
            _check_fitted_size(level, fitted.first, h)
            return fitted(h.shape[0])
        if level == 0 or not self.prior_heads:
            return None
        prior = self.prior_heads[level - 1](h)
        if str(level) in self.recentred_priors:
            recentred = self.recentred_priors[str(level)]
            _check_fitted_size(level, recentred.first, h)
            return recentred(prior)
        return prior

    def learned_prior(self, level: int, prior: DiagonalGaussian) -> DiagonalGaussian:
        """The prior a residual posterior is built from: the learned one under ``prior``."""
        if str(level) in self.recentred_priors:
            return self.recentred_priors[str(level)].learned(prior)
        return prior

    def absorb(self, level: int, h: Tensor, z: Tensor) -> Tensor:
        """The state after injecting z_level and running the cells of that scale."""
        injected = self.z_in[level](z)
        # Under autocast the injection is bf16; casting the state to it keeps the whole residual
        # stream in bf16 rather than promoting it to fp32 and re-casting before every conv.
        return self.stacks[level](injected + h.to(injected.dtype))

    def likelihood(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Per-pixel mean and bounded log-scale of p(x | z), in float32."""
        mean, raw_log_scale = _fp32_conv(self.out, h).chunk(2, dim=1)
        span = X_LOG_SCALE_MAX - X_LOG_SCALE_MIN
        return mean, X_LOG_SCALE_MIN + span * torch.sigmoid(raw_log_scale)


# choose(level, prior, state) -> the value of z_level; prior is None where it is fixed (see Group),
# state is the decoder state z_level is injected into.
Chooser = Callable[[int, "DiagonalGaussian | None", Tensor], Tensor]


class HierarchicalVAE(nn.Module):
    """The one model class; ``config.kind`` selects vae / nvae / nvmp / nvmp+."""

    def __init__(self, config: HVAEConfig) -> None:
        super().__init__()
        self.config = config
        residual_scale = 1.0 / math.sqrt(max(1, 2 * sum(config.scale_cells)))
        self.encoder = Encoder(config, residual_scale)
        self.decoder = Decoder(config, residual_scale, self.group_shapes(config.image_size))
        self.pseudo_inputs = (
            nn.Parameter(torch.randn(config.pseudo_inputs, config.in_channels, *config.image_size))
            if config.vamp
            else None
        )
        self.seg_head = (
            SegmentationHead(
                config.latent_channels, config.scale_widths[config.z_p], config.levels - config.z_p
            )
            if config.supervised
            else None
        )

    # ---- shapes and layout -------------------------------------------------------------------

    @property
    def multiple(self) -> int:
        return 2**self.config.levels

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        m = self.multiple
        return (-(-size[0] // m) * m, -(-size[1] // m) * m)

    def group_shapes(self, size: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(C, H_l, W_l) of every group for an input of ``size`` (before padding)."""
        ph, pw = self.padded_size(size)
        c, L = self.config.latent_channels, self.config.levels
        return [(c, ph >> (L - level), pw >> (L - level)) for level in range(L + 1)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _memory_format(self) -> torch.memory_format:
        # The output conv's weight (2C_in, width, 3, 3) has distinct strides in the two layouts.
        weight = self.decoder.out.weight
        channels_last = weight.is_contiguous(memory_format=torch.channels_last)
        return torch.channels_last if channels_last else torch.contiguous_format

    def _pad(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise InputError(
                f"model input: expected a batch of shape (B, {self.config.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        ph, pw = self.padded_size(tuple(x.shape[-2:]))
        if self.config.vamp and (ph, pw) != self.padded_size(self.config.image_size):
            raise InputError(
                f"model input: {self.config.kind} has pseudo-inputs of size "
                f"{self.config.image_size}, so images must pad to the same "
                f"{self.padded_size(self.config.image_size)}; got {tuple(x.shape[-2:])}"
            )
        pad = (0, pw - x.shape[-1], 0, ph - x.shape[-2])
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        return x.contiguous(memory_format=self._memory_format())

    # ---- bottom-up ----------------------------------------------------------------------------

    def _features(self, x: Tensor) -> tuple[list[Tensor], list[DiagonalGaussian] | None]:
        """Encoder features of the padded images and, for vamp kinds, the VampPrior components.

        The images and the pseudo-inputs go through the encoder trunk as one batch.
        """
        if self.pseudo_inputs is None:
            return self.encoder(x, self._memory_format()), None
        batch = x.shape[0]
        both = self.encoder(
            torch.cat([x, self._pad(self.pseudo_inputs)], dim=0), self._memory_format()
        )
        return [f[:batch] for f in both], self._components([f[batch:] for f in both])

    def _components(self, features: list[Tensor]) -> list[DiagonalGaussian]:
        """q_phi(z_l | u_k) from the pseudo-inputs' features, for the groups the kind's prior
        uses: z_0 for nvmp, every group for nvmp+.

        For l > 0 the component is u_k's own delta N(dmu_l(u_k), dsig_l(u_k)); with a joint
        posterior that delta reads u_k's decoder state, so the pseudo-inputs then run their own
        top-down pass (each group at its posterior mean given the means above it).
        """
        heads = self.encoder.heads  # z_0's head, and every head of an encoder posterior, read
        if self.config.kind != "nvmp+":  # the features alone
            return [heads[0](features[0])]
        if not self.config.joint:
            return [head(f) for head, f in zip(heads, features, strict=True)]
        _, _, groups = self._posterior_pass(features, self.config.image_size, sample=False)
        return [g.delta for g in groups]

    def pseudo_components(self) -> list[DiagonalGaussian] | None:
        """The VampPrior components q_phi(z_l | u_k) (batch K; see :meth:`_components`), or None
        for kinds without pseudo-inputs."""
        if self.pseudo_inputs is None:
            return None
        return self._components(self.encoder(self._pad(self.pseudo_inputs), self._memory_format()))

    @torch.no_grad()
    def init_pseudo_inputs(self, x: Tensor) -> None:
        """Set the pseudo-inputs to training images (cycled if fewer than K): a better start than
        noise, since the VampPrior's modes then begin where the data are."""
        if self.pseudo_inputs is None:
            raise ValueError(f"init_pseudo_inputs: kind {self.config.kind} has no pseudo-inputs")
        if tuple(x.shape[1:]) != tuple(self.pseudo_inputs.shape[1:]):
            expected = tuple(self.pseudo_inputs.shape[1:])
            raise InputError(
                f"init_pseudo_inputs: expected images of shape {expected}, got {tuple(x.shape[1:])}"
            )
        index = torch.arange(self.pseudo_inputs.shape[0]) % x.shape[0]
        self.pseudo_inputs.copy_(x[index])

    # ---- top-down ----------------------------------------------------------------------------

    def _top_down(
        self, batch: int, padded: tuple[int, int], choose: Chooser
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Generate top-down; ``choose(l, prior, state)`` returns z_l given the prior and the
        decoder state at that point."""
        L = self.config.levels
        h = self.decoder.initial_state(
            batch, (padded[0] >> L, padded[1] >> L), self._memory_format()
        )
        zs: list[Tensor] = []
        for level in range(L + 1):
            if level > 0:
                h = self.decoder.grow(level, h)
            z = choose(level, self.decoder.prior(level, h), h)
            h = self.decoder.absorb(level, h, z)
            zs.append(z)
        mean, log_scale = self.decoder.likelihood(h)
        return mean, log_scale, zs

    def _seg(self, zs: list[Tensor], size: tuple[int, int]) -> Tensor | None:
        if self.seg_head is None:
            return None
        return self.seg_head(zs[self.config.z_p])[..., : size[0], : size[1]]

    def _posterior_pass(
        self, features: list[Tensor], size: tuple[int, int], sample: bool
    ) -> tuple[Tensor, Tensor, list[Group]]:
        groups: list[Group] = []
        fitted, recentred = self.config.fitted_prior_levels, self.config.recentred_levels

        def choose(level: int, prior: DiagonalGaussian | None, state: Tensor) -> Tensor:
            delta = self.encoder.delta(level, features[level], state)
            residual = prior is not None and level not in fitted
            q = (residual_posterior(self.decoder.learned_prior(level, prior), delta) if residual
                 else delta)
            z = q.sample() if sample else q.mu
            groups.append(Group(z, q, delta, prior, residual and level not in recentred))
            return z

        padded = self.padded_size(size)
        mean, log_scale, _ = self._top_down(features[0].shape[0], padded, choose)
        return mean[..., : size[0], : size[1]], log_scale[..., : size[0], : size[1]], groups

    def forward(self, x: Tensor) -> HVAEOutput:
        """One reparameterised pass: z ~ q(z | x), then p(x | z); what the objectives need."""
        size = (x.shape[-2], x.shape[-1])
        features, pseudo = self._features(self._pad(x))
        mean, log_scale, groups = self._posterior_pass(features, size, sample=True)
        if self.training:  # this pass's KL used the prior before the update
            for level, prior in self.decoder.fitted_priors.items():
                prior.update(groups[int(level)].posterior)
            for level, prior in self.decoder.recentred_priors.items():
                prior.update(groups[int(level)].delta, groups[int(level)].prior)
        seg = self._seg([g.z for g in groups], size)
        return HVAEOutput(self.config.kind, mean, log_scale, groups, pseudo, seg)

    # ---- densities ---------------------------------------------------------------------------

    def log_prior_z(
        self, level: int, group: Group, pseudo: list[DiagonalGaussian] | None
    ) -> Tensor:
        """Per-sample log p(z_l | z_<l) of a pass's group (the VampPrior for z_0 of vamp kinds)."""
        if group.prior is not None:
            return sum_per_sample(group.prior.log_prob(group.z))
        if level == 0 and pseudo is not None:
            return mixture_log_prob(group.z, pseudo[0])
        return sum_per_sample(DiagonalGaussian.standard(group.z).log_prob(group.z))

    @torch.no_grad()
    def importance_weighted_log_likelihood(
        self, x: Tensor, samples: int = 100, chunk_size: int = 64, bins: Bins | None = None
    ) -> Tensor:
        """Per-image estimate of log p(x) in nats: log (1/S) sum_s p(x, z_s) / q(z_s | x).

        The encoder trunk runs once (its features do not depend on z); the top-down pass runs
        for the S samples in chunks of at most ``chunk_size`` (image, sample) pairs, so memory is
        bounded by ``chunk_size`` whatever S is. A lower bound on log p(x) that tightens as S grows;
        S = 1 is the one-sample ELBO. ``bins``: p(x | z) is the probability of each pixel's bin
        (a lower bound on log P(binned x), whose expectation is <= 0); None: the continuous
        Gaussian density the model is trained with.
        """
        if samples < 1 or chunk_size < 1:
            raise PathanatError(
                f"importance_weighted_log_likelihood: samples and chunk_size must be >= 1, got "
                f"{samples} and {chunk_size}"
            )
        size = (x.shape[-2], x.shape[-1])
        batch = x.shape[0]
        features, pseudo = self._features(self._pad(x))
        per_chunk = max(1, chunk_size // batch)
        log_w = []
        for start in range(0, samples, per_chunk):
            n = min(per_chunk, samples - start)
            repeated = [f.repeat(n, 1, 1, 1) for f in features]
            mean, log_scale, groups = self._posterior_pass(repeated, size, sample=True)
            xs = x.repeat(n, 1, 1, 1)
            w = (gaussian_log_likelihood(xs, mean, log_scale) if bins is None else
                 sum_per_sample(discretized_gaussian_log_probs(xs, mean, log_scale, bins)))
            for level, g in enumerate(groups):
                log_q = sum_per_sample(g.posterior.log_prob(g.z))
                w = w + self.log_prior_z(level, g, pseudo) - log_q
            log_w.append(w.view(n, batch))
        return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(samples)

    # ---- codes, generation, synthesis ---------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: Tensor) -> Encoding:
        """Posterior means of every group, top-down, each given the means above it."""
        size = (x.shape[-2], x.shape[-1])
        # the image alone through the encoder: codes need no VampPrior components
        features = self.encoder(self._pad(x), self._memory_format())
        _, _, groups = self._posterior_pass(features, size, sample=False)
        residuals = [g.z if g.prior is None else g.prior.standardise(g.z) for g in groups]
        return Encoding(
            z=[g.z for g in groups],
            residuals=residuals,
            posteriors=[g.posterior for g in groups],
            priors=[g.prior for g in groups],
            input_size=size,
        )

    def _generated(self, batch: int, size: tuple[int, int], choose: Chooser) -> Generated:
        mean, log_scale, zs = self._top_down(batch, self.padded_size(size), choose)
        crop = (..., slice(0, size[0]), slice(0, size[1]))
        return Generated(mean[crop], log_scale[crop], zs, self._seg(zs, size))

    def _prior_sample(
        self, level: int, prior: DiagonalGaussian | None, shape: tuple[int, ...], temperature: float
    ) -> Tensor:
        """z_level from its prior at ``temperature`` (the std of the noise is scaled by it)."""
        if prior is not None:
            return prior.sample(temperature)
        device = self.decoder.start.device
        if level == 0 and self.pseudo_inputs is not None:
            components = self.pseudo_components()[0]
            pick = torch.randint(components.mu.shape[0], (shape[0],), device=device)
            chosen = DiagonalGaussian(components.mu[pick], components.log_sigma[pick])
            return chosen.sample(temperature)
        return temperature * torch.randn(shape, device=device)

    @torch.no_grad()
    def decode(self, z: list[Tensor], size: tuple[int, int] | None = None) -> Generated:
        """Images from given latents (one tensor per group, shapes as ``group_shapes``).

        ``size`` crops the output (default: the padded size the latents imply).
        """
        self._check_latents(z)
        return self._generated(z[0].shape[0], size or self._implied_size(z),
                               lambda level, prior, state: z[level])

    @torch.no_grad()
    def from_residuals(self, r: list[Tensor], size: tuple[int, int] | None = None) -> Generated:
        """Images from standardised residuals (``Encoding.residuals``' form), top-down: each group
        is mu_l + sig_l * r_l under the prior its context gives (r_l itself where the prior is
        fixed). ``size`` as in :meth:`decode`."""
        self._check_latents(r)

        def choose(level: int, prior: DiagonalGaussian | None, state: Tensor) -> Tensor:
            return prior.unstandardise(r[level]) if prior is not None else r[level]

        return self._generated(r[0].shape[0], size or self._implied_size(r), choose)

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, size: tuple[int, int] | None = None
    ) -> Generated:
        """``n`` images drawn from the prior, top-down, noise scaled by ``temperature``."""
        size = size or self.config.image_size
        shapes = self.group_shapes(size)

        def choose(level: int, prior: DiagonalGaussian | None, state: Tensor) -> Tensor:
            return self._prior_sample(level, prior, (n, *shapes[level]), temperature)

        return self._generated(n, size, choose)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The likelihood mean for the posterior means of ``x`` (cropped to x's size)."""
        enc = self.encode(x)
        kept = self._generated(x.shape[0], enc.input_size, lambda level, prior, state: enc.z[level])
        return kept.x_mean

    def _kept(
        self, enc: Encoding, level: int, prior: DiagonalGaussian | None, mode: ResampleMode
    ) -> Tensor:
        if mode == "residual" and prior is not None:
            return prior.unstandardise(enc.residuals[level])
        return enc.z[level]

    def _check_groups(self, groups: Collection[int], name: str) -> set[int]:
        groups = set(groups)
        bad = sorted(g for g in groups if not (isinstance(g, int) and 0 <= g <= self.config.levels))
        if bad:
            raise PathanatError(
                f"{name}: expected group indices in 0..{self.config.levels}, got {bad}"
            )
        return groups

    @staticmethod
    def _check_mode(mode: str) -> None:
        if mode not in ("value", "residual"):
            raise PathanatError(f"mode: expected 'value' or 'residual', got {mode!r}")

    def _implied_size(self, z: list[Tensor]) -> tuple[int, int]:
        """The padded image size a set of latents implies (z_0 is at 1/2^L of it)."""
        L = self.config.levels
        return (z[0].shape[-2] << L, z[0].shape[-1] << L)

    def _check_latents(self, z: list[Tensor]) -> None:
        if len(z) != self.config.num_groups:
            raise InputError(f"latents: expected {self.config.num_groups} groups, got {len(z)}")

    @torch.no_grad()
    def resample(
        self,
        x: Tensor,
        keep: Collection[int],
        temperature: float = 1.0,
        mode: ResampleMode = "value",
    ) -> Generated:
        """Keep the groups in ``keep`` from x's posterior (means); draw the others from the prior,
        top-down, conditioned on what is kept and drawn above them.

        ``mode="value"``: a kept group keeps its value z_l. ``mode="residual"``: a kept group keeps
        its standardised residual r_l = (z_l - mu_l) / sig_l and is re-expressed in the new context
        as mu'_l + sig'_l * r_l, so it moves with the groups above it (for the residual kinds and
        l > 0; where the prior depends on nothing -- vae, z_0 -- value and residual coincide).
        """
        keep = self._check_groups(keep, "resample keep")
        self._check_mode(mode)
        enc = self.encode(x)
        shapes = self.group_shapes(enc.input_size)
        batch = x.shape[0]

        def choose(level: int, prior: DiagonalGaussian | None, state: Tensor) -> Tensor:
            if level in keep:
                return self._kept(enc, level, prior, mode)
            return self._prior_sample(level, prior, (batch, *shapes[level]), temperature)

        return self._generated(batch, enc.input_size, choose)

    @torch.no_grad()
    def mix(
        self, x_a: Tensor, x_b: Tensor, from_a: Collection[int], mode: ResampleMode = "value"
    ) -> Generated:
        """Groups in ``from_a`` from subject a's posterior means, the rest from subject b's
        (``mode`` as in :meth:`resample`); x_a and x_b have the same shape."""
        from_a = self._check_groups(from_a, "mix from_a")
        self._check_mode(mode)
        if x_a.shape != x_b.shape:
            raise InputError(f"mix: x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} differ")
        enc_a, enc_b = self.encode(x_a), self.encode(x_b)

        def choose(level: int, prior: DiagonalGaussian | None, state: Tensor) -> Tensor:
            return self._kept(enc_a if level in from_a else enc_b, level, prior, mode)

        return self._generated(x_a.shape[0], enc_a.input_size, choose)
