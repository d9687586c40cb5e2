"""The multi-scale hierarchical VAE with four prior structures: vae, nvae, nvmp, nvmp+ (Table 2).

Groups are numbered top-down: z_0 is the coarsest (1/2^L of the padded input), z_L is at full
resolution (and z_L+1, ... with ``fine_groups`` > 1). The four kinds share one encoder and one
decoder trunk, so their capacity is the same; they differ only in what a kind needs:

- ``vae``: q(z_l | x) = N(dmu_l(x), dsig_l(x)) and p(z_l) = N(0, I) for every l; the decoder
  parameterises no distribution, so the posterior is the encoder's alone.
- ``nvae``: z_0 as in the vae; for l > 0 the decoder state gives the prior p(z_l | z_<l) =
  N(mu_l, sig_l) and the posterior is the residual N(mu_l + dmu_l, sig_l * dsig_l).
- ``nvmp``: as nvae, with p(z_0) = (1/K) sum_k q(z_0 | u_k), u_k trainable pseudo-inputs.
- ``nvmp+``: as nvmp; its objective adds, for l >= 1, KL[p(z_l | z_<l) || (1/K) sum_k
  q_phi(z_l | u_k)], q_phi(z_l | u_k) the encoder's own Gaussian of u_k at scale l.

With ``posterior: joint`` (the default) the deltas of groups l > 0 read the image's features and
the decoder state, as NVAE's and VDVAE's inference do; ``posterior: encoder`` (Table 2's literal
dmu_phi(x)) reconstructs but never learns a prior that generates (docs/generation.md). Inputs
are padded (edge replication, bottom/right) to a multiple of 2^L and outputs cropped back. Fast
path: ``model.to(memory_format=torch.channels_last)`` under ``torch.autocast("cpu",
dtype=torch.bfloat16)``: trunks and latent heads run in bf16, the likelihood head and every
density and KL in fp32. Also in models/: config.py, heads.py, priors.py (fitted and recentred
priors), edit.py (partial resampling and mixing), objectives.py (Table 3's objective).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathanat.errors import InputError, PathanatError
from pathanat.models.blocks import (
    conv1x1,
    conv3x3,
    downsample,
    residual_stack,
    upsample,
    width_change,
)
from pathanat.models.config import HVAEConfig
from pathanat.models.distributions import (
    Bins,
    DiagonalGaussian,
    discretized_gaussian_log_probs,
    gaussian_log_likelihood,
    mixture_log_prob,
    residual_posterior,
    sum_per_sample,
)
from pathanat.models.heads import GaussianHead, SegmentationHead, likelihood_parameters
from pathanat.models.outputs import Encoding, Generated, Group, HVAEOutput
from pathanat.models.priors import FittedPrior, RecentredPrior, check_fitted_size


def scale_stacks(config: HVAEConfig, residual_scale: float) -> nn.ModuleList:
    """A trunk's residual cells: one stack per scale, indexed as the groups (0: the coarsest)."""
    return nn.ModuleList(residual_stack(w, cells, residual_scale)
                         for w, cells in zip(config.scale_widths, config.scale_cells, strict=True))


class Encoder(nn.Module):
    """Bottom-up trunk: full resolution -> 1/2^L, the features of every scale, and one head of
    (dmu_l, dsig_l) per scale. With ``posterior: joint`` the heads of groups l > 0 read the
    features concatenated with the decoder state, so they run in the top-down pass (:meth:`delta`).
    """

    def __init__(self, config: HVAEConfig, residual_scale: float) -> None:
        super().__init__()
        widths, channels = config.scale_widths, config.latent_channels
        self.joint = config.joint
        self.stem = conv3x3(config.in_channels, widths[-1])
        self.stacks = scale_stacks(config, residual_scale)  # the pass runs l = L .. 0
        # widen[l - 1] maps scale l's width to scale l-1's after downsampling
        self.widen = nn.ModuleList(width_change(widths[level], widths[level - 1])
                                   for level in range(1, len(widths)))
        self.extra = config.fine_groups - 1  # groups beyond one at the finest scale
        self.heads = nn.ModuleList(GaussianHead(2 * w if self.joint and level > 0 else w, channels)
                                   for level, w in enumerate(config.group_widths))

    def forward(self, x: Tensor, memory_format: torch.memory_format) -> list[Tensor]:
        """The features of every group, indexed top-down (l = 0, the coarsest, first); the
        groups at the finest scale share its features."""
        # With one input channel both layouts look alike to conv, so the stem's output layout is
        # set explicitly; every later op keeps it.
        h = self.stem(x).contiguous(memory_format=memory_format)
        features: list[Tensor] = []
        for level in reversed(range(len(self.stacks))):
            h = self.stacks[level](h)
            features.append(h)
            if level > 0:
                h = self.widen[level - 1](downsample(h))
        return features[::-1] + features[:1] * self.extra

    def delta(self, level: int, features: Tensor, state: Tensor) -> DiagonalGaussian:
        """N(dmu_l, dsig_l) of group ``level`` from its features (and the decoder state)."""
        if self.joint and level > 0:
            features = torch.cat([features, state.to(features.dtype)], dim=1)
        return self.heads[level](features)


class Decoder(nn.Module):
    """Top-down trunk: a learned constant at 1/2^L, each group injected by a 1x1 conv, then cells.
    For the residual kinds a head on the (upsampled) state gives the prior of groups l > 0; the
    fitted and recentred priors (priors.py) hold moments of the groups' ``shapes`` at the
    configured image size."""

    def __init__(self, config: HVAEConfig, residual_scale: float,
                 shapes: list[tuple[int, int, int]]) -> None:
        super().__init__()
        widths, channels = config.scale_widths, config.latent_channels
        self.start = nn.Parameter(torch.zeros(1, widths[0], 1, 1))
        self.levels = config.levels
        self.z_in = nn.ModuleList(conv1x1(channels, w) for w in config.group_widths)
        # cells after each group's injection: a scale's, and the finest scale's for extra groups
        self.stacks = scale_stacks(config, residual_scale)
        self.stacks.extend(residual_stack(widths[-1], config.scale_cells[-1], residual_scale)
                           for _ in range(config.fine_groups - 1))
        # narrow[l - 1] maps scale l-1's width to scale l's after upsampling
        self.narrow = nn.ModuleList(width_change(widths[level - 1], widths[level])
                                    for level in range(1, len(widths)))
        # prior_heads[l - 1] gives p(z_l | z_<l) for every group l > 0; the vae has none.
        priors = config.group_widths[1:] if config.residual else ()
        self.prior_heads = nn.ModuleList(GaussianHead(w, channels) for w in priors)
        self.out = conv3x3(widths[-1], 2 * config.in_channels)
        self.fitted_priors = nn.ModuleDict(
            {str(level): FittedPrior(shapes[level]) for level in config.fitted_prior_levels})
        self.recentred_priors = nn.ModuleDict(
            {str(level): RecentredPrior(shapes[level]) for level in config.recentred_levels})

    def grow(self, level: int, h: Tensor) -> Tensor:
        """The state carried from group ``level - 1`` to group ``level``: upsampled where the
        scale changes."""
        if level > self.levels:
            return h
        return self.narrow[level - 1](upsample(h))

    def initial_state(self, batch: int, size: tuple[int, int],
                      memory_format: torch.memory_format) -> Tensor:
        return self.start.expand(batch, -1, *size).contiguous(memory_format=memory_format)

    def prior(self, level: int, h: Tensor) -> DiagonalGaussian | None:
        """p(z_level | z_<level) from the state (recentred where configured), the fitted
        unconditional prior, or None where the prior is fixed."""
        if str(level) in self.fitted_priors:
            fitted = self.fitted_priors[str(level)]
            check_fitted_size(level, fitted.first, h)
            return fitted(h.shape[0])
        if level == 0 or not self.prior_heads:
            return None
        prior = self.prior_heads[level - 1](h)
        if str(level) in self.recentred_priors:
            recentred = self.recentred_priors[str(level)]
            check_fitted_size(level, recentred.first, h)
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
        return likelihood_parameters(self.out, h)


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
        pseudo_shape = (config.pseudo_inputs, config.in_channels, *config.image_size)
        self.pseudo_inputs = nn.Parameter(torch.randn(pseudo_shape)) if config.vamp else None
        z_p = config.z_p  # the segmentation head upsamples z_P to full resolution
        self.seg_head = (SegmentationHead(config.latent_channels, config.scale_widths[z_p],
                                          config.levels - z_p) if config.supervised else None)

    # ---- shapes and layout -------------------------------------------------------------------

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``size`` rounded up to a multiple of 2^L, the size inputs are padded to."""
        m = 2**self.config.levels
        return (-(-size[0] // m) * m, -(-size[1] // m) * m)

    def group_shapes(self, size: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(C, H_l, W_l) of every group for an input of ``size`` (before padding)."""
        ph, pw = self.padded_size(size)
        c, L = self.config.latent_channels, self.config.levels
        scales = [self.config.scale_of(g) for g in range(self.config.num_groups)]
        return [(c, ph >> (L - s), pw >> (L - s)) for s in scales]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _memory_format(self) -> torch.memory_format:
        # The output conv's weight (2C_in, width, 3, 3) has distinct strides in the two layouts.
        if self.decoder.out.weight.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        return torch.contiguous_format

    def _pad(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise InputError(f"model input: expected a batch of shape (B, "
                             f"{self.config.in_channels}, H, W), got {tuple(x.shape)}")
        ph, pw = self.padded_size(tuple(x.shape[-2:]))
        if self.config.vamp and (ph, pw) != self.padded_size(self.config.image_size):
            raise InputError(f"model input: {self.config.kind} has pseudo-inputs of size "
                             f"{self.config.image_size}, so images must pad to the same "
                             f"{self.padded_size(self.config.image_size)}; "
                             f"got {tuple(x.shape[-2:])}")
        pad = (0, pw - x.shape[-1], 0, ph - x.shape[-2])
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        return x.contiguous(memory_format=self._memory_format())

    # ---- bottom-up ----------------------------------------------------------------------------

    def _features(self, x: Tensor) -> tuple[list[Tensor], list[DiagonalGaussian] | None]:
        """Encoder features of the padded images and, for vamp kinds, the VampPrior components
        (the images and the pseudo-inputs go through the encoder trunk as one batch)."""
        if self.pseudo_inputs is None:
            return self.encoder(x, self._memory_format()), None
        batch = x.shape[0]
        both = self.encoder(torch.cat([x, self._pad(self.pseudo_inputs)]), self._memory_format())
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
            raise InputError(f"init_pseudo_inputs: expected images of shape {expected}, "
                             f"got {tuple(x.shape[1:])}")
        index = torch.arange(self.pseudo_inputs.shape[0]) % x.shape[0]
        self.pseudo_inputs.copy_(x[index])

    # ---- top-down ----------------------------------------------------------------------------

    def _top_down(self, batch: int, padded: tuple[int, int],
                  choose: Chooser) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Generate top-down; ``choose(l, prior, state)`` returns z_l given the prior and the
        decoder state at that point."""
        L = self.config.levels
        h = self.decoder.initial_state(batch, (padded[0] >> L, padded[1] >> L),
                                       self._memory_format())
        zs: list[Tensor] = []
        for level in range(self.config.num_groups):
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

    def _posterior_pass(self, features: list[Tensor], size: tuple[int, int],
                        sample: bool) -> tuple[Tensor, Tensor, list[Group]]:
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
        return HVAEOutput(mean, log_scale, groups, pseudo, seg)

    # ---- densities ---------------------------------------------------------------------------

    def log_prior_z(self, level: int, group: Group,
                    pseudo: list[DiagonalGaussian] | None) -> Tensor:
        """Per-sample log p(z_l | z_<l) of a pass's group (the VampPrior for z_0 of vamp kinds)."""
        if group.prior is not None:
            return sum_per_sample(group.prior.log_prob(group.z))
        if level == 0 and pseudo is not None:
            return mixture_log_prob(group.z, pseudo[0])
        return sum_per_sample(DiagonalGaussian.standard(group.z).log_prob(group.z))

    def importance_weighted_log_likelihood(self, x: Tensor, samples: int = 100,
                                           chunk_size: int = 64,
                                           bins: Bins | None = None) -> Tensor:
        """Per image, log (1/S) sum_s p(x, z_s) / q(z_s | x) in nats: a bound on log p(x) tighter
        as S grows (S = 1: the ELBO); ``bins``: of the binned x (<= 0), None: the density."""
        return self.importance_weighted_log_likelihoods(x, samples, chunk_size, (bins,))[0]

    @torch.no_grad()
    def importance_weighted_log_likelihoods(self, x: Tensor, samples: int, chunk_size: int,
                                            likelihoods: Sequence[Bins | None]) -> Tensor:
        """The IW bound under each of ``likelihoods`` (a ``bins`` each) from the same z_s,
        (len(likelihoods), N): the encoder trunk runs once, the top-down pass (the cost) once per
        chunk of at most ``chunk_size`` (image, sample) pairs, so memory is bounded whatever S."""
        if samples < 1 or chunk_size < 1:
            raise PathanatError(f"importance_weighted_log_likelihood: samples and chunk_size "
                                f"must be >= 1, got {samples} and {chunk_size}")
        size, batch = (x.shape[-2], x.shape[-1]), x.shape[0]
        features, pseudo = self._features(self._pad(x))
        per_chunk = max(1, chunk_size // batch)
        log_w: list[list[Tensor]] = [[] for _ in likelihoods]
        for start in range(0, samples, per_chunk):
            n = min(per_chunk, samples - start)
            repeated = [f.repeat(n, 1, 1, 1) for f in features]
            mean, log_scale, groups = self._posterior_pass(repeated, size, sample=True)
            xs = x.repeat(n, 1, 1, 1)
            terms = [(self.log_prior_z(level, g, pseudo), sum_per_sample(g.posterior.log_prob(g.z)))
                     for level, g in enumerate(groups)]
            for i, bins in enumerate(likelihoods):
                w = (gaussian_log_likelihood(xs, mean, log_scale) if bins is None else
                     sum_per_sample(discretized_gaussian_log_probs(xs, mean, log_scale, bins)))
                for log_p, log_q in terms:
                    w = w + log_p - log_q
                log_w[i].append(w.view(n, batch))
        return torch.stack([torch.cat(w).logsumexp(0) for w in log_w]) - math.log(samples)

    # ---- codes and generation ----------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: Tensor) -> Encoding:
        """Posterior means of every group, top-down, each given the means above it."""
        size = (x.shape[-2], x.shape[-1])
        # the image alone through the encoder: codes need no VampPrior components
        features = self.encoder(self._pad(x), self._memory_format())
        _, _, groups = self._posterior_pass(features, size, sample=False)
        residuals = [g.z if g.prior is None else g.prior.standardise(g.z) for g in groups]
        return Encoding(z=[g.z for g in groups], residuals=residuals,
                        posteriors=[g.posterior for g in groups], priors=[g.prior for g in groups],
                        input_size=size)

    def generate(self, batch: int, size: tuple[int, int], choose: Chooser) -> Generated:
        """Images of ``size`` from one top-down pass in which ``choose`` gives every z_l."""
        mean, log_scale, zs = self._top_down(batch, self.padded_size(size), choose)
        crop = (..., slice(0, size[0]), slice(0, size[1]))
        return Generated(mean[crop], log_scale[crop], zs, self._seg(zs, size))

    def draw_from_prior(self, level: int, prior: DiagonalGaussian | None, shape: tuple[int, ...],
                        temperature: float) -> Tensor:
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
        """Images from given latents (one tensor per group, shapes as ``group_shapes``), cropped
        to ``size`` (default: the padded size the latents imply)."""
        return self.generate(z[0].shape[0], self._output_size(z, size),
                             lambda level, prior, state: z[level])

    @torch.no_grad()
    def from_residuals(self, r: list[Tensor], size: tuple[int, int] | None = None,
                       last: Callable[[Tensor, Tensor], Tensor] | None = None) -> Generated:
        """Images from standardised residuals (``Encoding.residuals``' form), top-down: each group
        is mu_l + sig_l * r_l under the prior its context gives (r_l itself where the prior is
        fixed). ``size`` as in :meth:`decode`. ``last(state, r_L)``, where given, replaces the
        last group's residual given the decoder state there (``models.detail``)."""
        size = self._output_size(r, size)
        final = len(r) - 1

        def choose(level: int, prior: DiagonalGaussian | None, state: Tensor) -> Tensor:
            value = last(state, r[level]) if last is not None and level == final else r[level]
            return prior.unstandardise(value) if prior is not None else value

        return self.generate(r[0].shape[0], size, choose)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0,
               size: tuple[int, int] | None = None) -> Generated:
        """``n`` images drawn from the prior, top-down, noise scaled by ``temperature``."""
        size = size or self.config.image_size
        shapes = self.group_shapes(size)

        def choose(level: int, prior: DiagonalGaussian | None, state: Tensor) -> Tensor:
            return self.draw_from_prior(level, prior, (n, *shapes[level]), temperature)

        return self.generate(n, size, choose)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The likelihood mean for the posterior means of ``x`` (cropped to x's size)."""
        enc = self.encode(x)
        return self.decode(enc.z, enc.input_size).x_mean

    def _output_size(self, z: list[Tensor], size: tuple[int, int] | None) -> tuple[int, int]:
        """``size``, or the padded image size latents imply (z_0 is at 1/2^L of it)."""
        if len(z) != self.config.num_groups:
            raise InputError(f"latents: expected {self.config.num_groups} groups, got {len(z)}")
        L = self.config.levels
        return size or (z[0].shape[-2] << L, z[0].shape[-1] << L)
