"""The training engine: experiment configs, the LightningModule, run folders, resume."""

from pathanat.training.config import (
    DataConfig,
    ExperimentConfig,
    ObjectiveConfig,
    OptimConfig,
    PhantomConfig,
    TrainerConfig,
    load_experiment,
)
from pathanat.training.module import HVAEModule
from pathanat.training.run import (
    load_trained,
    resume,
    train,
    train_config,
)

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "HVAEModule",
    "ObjectiveConfig",
    "OptimConfig",
    "PhantomConfig",
    "TrainerConfig",
    "load_experiment",
    "load_trained",
    "resume",
    "train",
    "train_config",
]
