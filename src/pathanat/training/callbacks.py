"""Callbacks and loggers of a run: the validation reconstruction grid (TensorBoard image and PNG
in the run folder), the step checkpoints, and a CSV logger that survives a resume."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from pathanat.atomic import atomic_file
from pathanat.figures import WINDOW, save_figure, slice_montage


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
        x, reconstruction = grid
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
            f"{trainer.global_step}; standardised intensities, window {WINDOW[0]:g} to "
            f"{WINDOW[1]:g}."))


class StepCheckpoint(ModelCheckpoint):
    """A checkpoint every ``every_n_train_steps`` steps, as Lightning's, except that where a
    validation follows the same batch the checkpoint is written after it: Lightning writes it
    before, so a run killed during that validation resumed past it and its row was never logged.
    """

    def __init__(self, val_every: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_every = val_every
        self._deferred: tuple | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # one endless epoch, so batch_idx counts every batch, as Lightning's validation check does
        if (batch_idx + 1) % self.val_every == 0:
            self._deferred = (outputs, batch, batch_idx)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_deferred(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            super().on_train_batch_end(trainer, pl_module, *deferred)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_deferred(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        # a safety net: were Lightning's validation rule ever to differ from the one above, the
        # deferred checkpoint is written here, before the next step changes the state
        self._save_deferred(trainer, pl_module)


class RunCSVLogger(Logger):
    """``RUN/metrics.csv``: one row per logged step (train and validation rows apart), columns in
    name order, the whole file rewritten atomically on each save (at most a few thousand rows).

    ``resume_step``: the global step of the checkpoint a resumed session starts from. The rows
    the interrupted session logged from that step on are dropped -- the resumed session logs
    them again -- so every step appears once, as in a run that was never stopped.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        super().__init__()
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as file:
                self.rows = [row for row in csv.DictReader(file)
                             if row.get("step") and int(float(row["step"])) < resume_step]

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # RUN/config.yaml holds them

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {key: float(value) for key, value in metrics.items()}
        self.rows.append({**row, "step": step if step is not None else len(self.rows)})

    @rank_zero_only
    def save(self) -> None:
        keys = sorted({key for row in self.rows for key in row})
        with atomic_file(self.path) as tmp, open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()
