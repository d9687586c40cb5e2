"""The training engine: the LightningModule, run folders, resume (configs: ``pathanat.experiment``;
reading a trained run back: ``pathanat.runs``)."""

from pathanat.training.module import HVAEModule
from pathanat.training.run import resume, train, train_config

__all__ = ["HVAEModule", "resume", "train", "train_config"]
