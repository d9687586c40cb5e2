"""What defines a model: :class:`HVAEConfig` (the ``model`` section of an experiment config, and
what a checkpoint stores to rebuild its model) and the names of its choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pathanat.errors import ConfigError, checked_int

Kind = Literal["vae", "nvae", "nvmp", "nvmp+"]
KINDS: tuple[str, ...] = ("vae", "nvae", "nvmp", "nvmp+")
# each kind as config files and run folders spell it ("+" is no file-name character there)
KIND_NAMES: dict[str, str] = {kind: kind.replace("+", "plus") for kind in KINDS}
# the kinds whose p(z_0) is a VampPrior over trainable pseudo-inputs
VAMPPRIOR_KINDS: tuple[str, ...] = ("nvmp", "nvmp+")
Posterior = Literal["encoder", "joint"]
POSTERIORS: tuple[str, ...] = ("encoder", "joint")
UnconditionalPrior = Literal["standard", "fitted"]
UNCONDITIONAL_PRIORS: tuple[str, ...] = ("standard", "fitted")
ConditionalPrior = Literal["learned", "recentred"]
CONDITIONAL_PRIORS: tuple[str, ...] = ("learned", "recentred")


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
    pseudo_inputs: int = 8  # used by nvmp / nvmp+ only
    z_p: int = 2
    supervised: bool = False
    # groups at full resolution: 1 is the paper's one group per scale. More (NVAE's several
    # groups per scale) add latent channels where the detail is, each group's prior conditioned
    # on those before it, and a trunk stack per group; z_L, z_L+1, ... share the scale's features.
    # Measured on the cpu budget (docs/generation.md, thirteenth round): 2 or 3 sharpen the
    # reconstructions and the second stage's draws, at about 1.4x the training time.
    fine_groups: int = 1
    # "joint": the deltas read the decoder state too (NVAE's bidirectional inference)
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
        for key, choices in (("kind", KINDS), ("posterior", POSTERIORS),
                             ("conditional_prior", CONDITIONAL_PRIORS),
                             ("unconditional_prior", UNCONDITIONAL_PRIORS)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"model.{key}: expected one of {', '.join(choices)}, "
                                  f"got {getattr(self, key)!r}")
        for key in ("in_channels", "levels", "latent_channels", "width", "pseudo_inputs",
                    "fine_groups"):
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
        return self.levels + self.fine_groups

    def scale_of(self, group: int) -> int:
        """The scale group ``group`` lives at (0: the coarsest, levels: full resolution)."""
        return min(group, self.levels)

    @property
    def scale_widths(self) -> tuple[int, ...]:
        """Trunk width of every scale, top-down."""
        return self.widths or (self.width,) * (self.levels + 1)

    @property
    def group_widths(self) -> tuple[int, ...]:
        """Trunk width at every group's scale, top-down."""
        return tuple(self.scale_widths[self.scale_of(g)] for g in range(self.num_groups))

    @property
    def scale_cells(self) -> tuple[int, ...]:
        """Residual cells per trunk at every scale, top-down."""
        return self.cells or (self.cells_per_scale,) * (self.levels + 1)

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
        return self.kind in VAMPPRIOR_KINDS
