"""Callbacks and loggers of a run: the validation reconstruction grid (TensorBoard image and PNG
in the run folder) and a CSV logger that survives a resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from pathanat.figures import save_figure, slice_montage


class ReconstructionGrid(pl.Callback):
    """After each validation, draw the first validation slices over their reconstructions.

    The PNG at ``path`` is replaced each time (the latest state); TensorBoard keeps one image per
    validation, indexed by step.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grid = getattr(pl_module, "val_grid", None)
        if not trainer.is_global_zero or grid is None or trainer.sanity_checking:
            return
        x, reconstruction, _ = grid
        n = len(x)
        titles = [f"val input {i}" for i in range(n)] + [f"reconstruction {i}" for i in range(n)]
        titles[0] = f"step {trainer.global_step}: {titles[0]}"
        images = [*x[:, 0].numpy(), *reconstruction[:, 0].numpy()]
        fig = slice_montage(images, titles=titles, columns=n)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(
                    "val/reconstructions", fig, trainer.global_step, close=False
                )
        save_figure(fig, self.path, caption=(
            f"Validation slices (top) and their posterior-mean reconstructions (bottom) at step "
            f"{trainer.global_step}; standardised intensities, window -2.5 to 3.5."))


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class RunCSVLogger(CSVLogger):
    """``RUN/metrics.csv``, appended to when a run is resumed (Lightning's CSVLogger would delete
    it). Rows logged after the resumed checkpoint by the interrupted session stay, so a step can
    appear twice; the later row is the one that led to the final weights."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir, name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
