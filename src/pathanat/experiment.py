"""The experiment config: data, model, objective, optimiser, trainer and second-stage sections.

Read from YAML with :func:`load_experiment` (strict: an unknown key or a wrong type stops with a
``ConfigError`` naming the dotted key); the model section is :class:`HVAEConfig` itself. Defaults
are the paper's training settings (Adam, lr 5e-5, weight decay 1e-8, cyclical linear KL annealing
with a 10 000-step cycle from 2e-7, KL balancing).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

from pathanat.config import load_config
from pathanat.errors import ConfigError, checked_int
from pathanat.models import HVAEConfig

Precision = Literal["32", "bf16-mixed"]
LrDecay = Literal["none", "cosine"]


@dataclass
class PhantomConfig:
    """A phantom cohort to generate and prepare (reused when already made)."""

    kind: Literal["ms", "ad"] = "ms"
    subjects: int = 30
    seed: int = 0


@dataclass
class DataConfig:
    """Where the slices come from (exactly one of ``cache`` and ``phantom``) and how they load.

    ``data_dir`` holds a generated phantom (cohort and cache); by default the run folder's parent,
    so runs side by side share one phantom. ``shape`` and ``slices`` are passed to ``prepare``.
    """

    cache: Path | None = None
    phantom: PhantomConfig | None = None
    data_dir: Path | None = None
    shape: tuple[int, int] = (96, 112)
    slices: int | None = None
    batch_size: int = 16
    num_workers: int = 0
    flip_prob: float = 0.0
    intensity_scale: float = 0.0


@dataclass
class ObjectiveConfig:
    """Table 3's objective with the paper's KL annealing and balancing; supervision weight lambda
    is used when ``model.supervised``. A run no longer than ``kl_cycle`` sees one rise and no
    restart, which is what the short budgets use."""

    kl_cycle: int = 10_000  # cyclical linear KL annealing, a 10 000-iteration cycle ...
    kl_start: float = 2e-7  # ... starting from 2e-7
    kl_balance: bool = True  # NVAE's KL balancing while the KL weight is below 1
    # the KL weight the rise ends at, as a multiple of the ELBO's (a beta-VAE's beta; 1: the ELBO)
    kl_scale: float = 1.0
    # per group, top-down, a further multiple of kl_scale (None: 1 for every group); e.g.
    # [1, 1, 1, 1, 4] asks the finest group to carry less (docs/generation.md)
    kl_group_scale: tuple[float, ...] | None = None
    supervision_weight: float = 1.0

    def kl_scales(self, groups: int) -> tuple[float, ...]:
        """The KL weight each of ``groups`` groups reaches: kl_scale x kl_group_scale."""
        per_group = self.kl_group_scale or (1.0,) * groups
        return tuple(self.kl_scale * float(s) for s in per_group)


@dataclass
class OptimConfig:
    """Adam (weight decay as an L2 term, as torch's Adam and the paper) and gradient-norm clipping
    (``grad_clip: null`` = none, as in the paper); ``warmup_steps`` raises the learning rate
    linearly from lr / warmup_steps to lr over the first steps (0: none, as in the paper);
    ``lr_decay: cosine`` then lowers it along a half cosine to 0 at step ``decay_steps`` (null:
    ``trainer.max_steps``; none: constant, as in the paper). A short run then ends on weights that
    have settled rather than on whatever the last noisy step left (docs/generation.md). Set
    ``decay_steps`` when a run is trained in pieces with a growing ``max_steps``."""

    lr: float = 5e-5
    weight_decay: float = 1e-8
    grad_clip: float | None = None
    warmup_steps: int = 0
    lr_decay: LrDecay = "none"
    decay_steps: int | None = None

    def decay_end(self, max_steps: int) -> int | None:
        """The step the lr reaches 0 at in a run of ``max_steps`` (None: it never decays)."""
        if self.lr_decay != "cosine":
            return None
        return self.decay_steps if self.decay_steps is not None else max_steps

    def learning_rate(self, step: int, max_steps: int) -> float:
        """The lr of update ``step`` (0-based) of a run of ``max_steps``: a function of the step
        alone, so a resumed run continues the same schedule."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        end = self.decay_end(max_steps)
        if end is not None:
            progress = (step - self.warmup_steps) / max(1, end - self.warmup_steps)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.lr


@dataclass
class TrainerConfig:
    """How and where to run. Steps count applied optimiser updates (skipped steps do not count).

    ``channels_last: null`` means on for bf16-mixed and on a CPU (fp32 there: a demo step 0.64 s
    against 0.76 s in the default layout, AMD EPYC, 2 cores), off for fp32 on a GPU (as before;
    not measured there). ``val_batches: null`` validates on the whole validation split.
    ``max_consecutive_skips`` non-finite steps in a row stop the run.
    """

    max_steps: int = 100_000  # ten KL annealing cycles
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Precision = "32"  # or "bf16-mixed"
    channels_last: bool | None = None
    log_every: int = 50
    val_every: int = 1000
    val_batches: int | None = None
    checkpoint_every: int = 1000
    max_consecutive_skips: int = 20
    progress_bar: bool = True

    @property
    def use_channels_last(self) -> bool:
        if self.channels_last is not None:
            return self.channels_last
        on_cpu = self.accelerator == "cpu" or (
            self.accelerator == "auto" and not torch.cuda.is_available()
        )
        return self.precision == "bf16-mixed" or on_cpu


@dataclass
class SecondStageConfig:
    """The second-stage prior, fitted after training (``models.second_stage``).

    ``detail_steps``: fitting steps of a diffusion model of the finest group's detail off the
    second stage's span (``models.detail``), which its draws then carry; 0 leaves it out. It is
    slow on a CPU (8000 steps took 23 min on 2 cores, and 1024 draws 6.5 min) and helps only when
    fitted long enough (docs/generation.md, fifteenth round: 2500 steps were worse than none)."""

    detail_steps: int = 0


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: HVAEConfig = field(default_factory=HVAEConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    second_stage: SecondStageConfig = field(default_factory=SecondStageConfig)

    def __post_init__(self) -> None:
        check_experiment(self)


def check_experiment(config: ExperimentConfig) -> None:
    """Reject values that parse but make no sense, naming the key."""
    data, trainer = config.data, config.trainer
    if (data.cache is None) == (data.phantom is None):
        raise ConfigError(
            "data: expected exactly one of data.cache (a prepared slice cache) and data.phantom "
            f"(kind, subjects, seed), got {'both' if data.cache is not None else 'neither'}"
        )
    positive = {
        "data.batch_size": data.batch_size,
        "objective.kl_cycle": config.objective.kl_cycle,
        "trainer.max_steps": trainer.max_steps,
        "trainer.num_nodes": trainer.num_nodes,
        "trainer.log_every": trainer.log_every,
        "trainer.val_every": trainer.val_every,
        "trainer.checkpoint_every": trainer.checkpoint_every,
        "trainer.max_consecutive_skips": trainer.max_consecutive_skips,
    }
    if data.phantom is not None:
        positive["data.phantom.subjects"] = data.phantom.subjects
    if trainer.val_batches is not None:
        positive["trainer.val_batches"] = trainer.val_batches
    for key, value in positive.items():
        checked_int(value, key, error=ConfigError)
    nonnegative = {
        "data.num_workers": data.num_workers,
        "data.intensity_scale": data.intensity_scale,
        "optim.weight_decay": config.optim.weight_decay,
        "objective.supervision_weight": config.objective.supervision_weight,
        "optim.warmup_steps": config.optim.warmup_steps,
        "second_stage.detail_steps": config.second_stage.detail_steps,
    }
    for key, value in nonnegative.items():
        if value < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {value!r}")
    _check_ranges(config)


def _check_ranges(config: ExperimentConfig) -> None:
    """The checks of ``check_experiment`` on values bounded by more than 0."""
    data = config.data
    if not config.objective.kl_scale > 0:
        raise ConfigError(
            f"objective.kl_scale: expected a value > 0, got {config.objective.kl_scale!r}"
        )
    per_group, groups = config.objective.kl_group_scale, config.model.num_groups
    if per_group is not None and (len(per_group) != groups or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in per_group)):
        raise ConfigError(f"objective.kl_group_scale: expected {groups} values > 0 (one per "
                          f"group, top-down: model.levels + model.fine_groups), "
                          f"got {list(per_group)!r}")
    # Adam moves a weight by about lr per step whatever the gradient, so lr <= 1 also keeps every
    # update of a finite gradient finite
    if not 0.0 < config.optim.lr <= 1.0:
        raise ConfigError(f"optim.lr: expected a value in (0, 1], got {config.optim.lr!r}")
    if not 0.0 <= data.flip_prob <= 1.0:
        raise ConfigError(f"data.flip_prob: expected a value in [0, 1], got {data.flip_prob!r}")
    if not 0.0 < config.objective.kl_start <= 1.0:
        raise ConfigError(
            f"objective.kl_start: expected a value in (0, 1], got {config.objective.kl_start!r}"
        )
    optim = config.optim
    if optim.decay_steps is not None and optim.decay_steps <= optim.warmup_steps:
        raise ConfigError(
            f"optim.decay_steps: expected more than optim.warmup_steps ({optim.warmup_steps}), "
            f"got {optim.decay_steps}"
        )
    clip = config.optim.grad_clip
    if clip is not None and clip <= 0:
        raise ConfigError(f"optim.grad_clip: expected a value > 0 or null, got {clip!r}")
    if data.batch_size < 2:
        # active units are a variance over the batch
        raise ConfigError(f"data.batch_size: expected at least 2, got {data.batch_size}")
    if config.model.supervised and data.phantom is not None and data.phantom.kind != "ms":
        raise ConfigError(
            "model.supervised: lesion supervision needs lesion masks; data.phantom.kind is 'ad'"
        )


def packaged_configs() -> dict[str, Path]:
    """The experiment YAMLs shipped inside the package, by name (``nvmp_ms``, ``demo``, ...)."""
    folder = Path(str(resources.files("pathanat") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_path(name_or_path: str | os.PathLike) -> Path:
    """An existing YAML file, or the packaged config of that name (``nvmp_ms`` or ``nvmp_ms.yaml``),
    so installed users can train the shipped experiments without a checkout."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = packaged_configs()
    stem = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and stem in shipped:
        return shipped[stem]
    raise ConfigError(
        f"{name_or_path}: config file not found, and not a packaged config "
        f"(packaged: {', '.join(shipped)})"
    )


def load_experiment(
    path: str | os.PathLike | None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Read an experiment YAML (a file or a packaged config's name) and apply ``key.sub=value``
    overrides (strictly checked)."""
    return load_config(ExperimentConfig, None if path is None else config_path(path), overrides)
