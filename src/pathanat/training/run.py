"""`pathanat train`: one run folder per run, built on a Lightning Trainer.

Run folder layout:

    RUN/config.yaml                 the resolved config (absolute data paths)
    RUN/checkpoints/last.ckpt       the latest state; step0001000.ckpt ... every checkpoint_every
    RUN/metrics.csv                 every logged metric (Lightning's CSVLogger)
    RUN/tensorboard/                TensorBoard events (scalars and reconstruction images)
    RUN/figures/val_reconstructions.png   the latest validation reconstructions
    RUN/summary.json                steps, skipped steps, wall time, last validation metrics

A run folder is filled as training goes, not swapped in at the end: an interrupted run must keep
its checkpoints to be resumed. Each file in it is written aside and renamed (config, checkpoints,
figures, summary); Lightning appends the metrics CSV. A phantom named by the config is generated
and prepared once under ``data.data_dir`` (default: the run folder's parent) and reused after.

Scale: ``trainer.accelerator / devices / num_nodes / strategy`` go to Lightning unchanged (e.g.
``strategy: ddp``, ``devices: 4``; several nodes are launched as Lightning documents, with torchrun
or SLURM). The first process makes the phantom and writes the run folder; the others wait for the
cache, so a filesystem shared by the nodes is assumed. A resume continues exactly when it runs on
the same number of replicas (the train stream is sharded by rank) and on a deterministic backend
(CPU; on GPU, convolution algorithms may differ in the last bits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from pathanat.atomic import exclusive
from pathanat.config import apply_override, from_dict, save_config, to_dict
from pathanat.data.prepare import load_cache
from pathanat.errors import ConfigError, OutputBusyError, OutputExistsError, PathanatError
from pathanat.experiment import ExperimentConfig, load_experiment
from pathanat.jsonfiles import write_json
from pathanat.runs import (
    LAST,
    config_from_checkpoint,
    load_checkpoint,
    phantom_paths,
    with_folder_second_stage,
)
from pathanat.training.callbacks import ReconstructionGrid, RunCSVLogger, StepCheckpoint
from pathanat.training.checkpoint import AtomicCheckpointIO, newest_intact_checkpoint
from pathanat.training.data import TrainingDataModule
from pathanat.training.module import HVAEModule

# Our checkpoints are meant to hold the state after the step's update (manual optimisation).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# Ranks other than the first wait this long for the first to make a phantom cache.
DATA_WAIT_S = 3600.0


def train(
    config_path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    callbacks: Sequence[pl.Callback] = (),
) -> Path:
    """Train the experiment of ``config_path`` (with ``key=value`` overrides) into run folder
    ``out`` (default ``runs/<config name>``); returns the run folder."""
    config = load_experiment(config_path, list(overrides))
    name = Path(config_path).stem if config_path is not None else "experiment"
    run_dir = Path(out) if out is not None else Path("runs") / name
    return train_config(config, run_dir, overwrite, callbacks)


def train_config(
    config: ExperimentConfig,
    run_dir: str | os.PathLike,
    overwrite: bool = False,
    callbacks: Sequence[pl.Callback] = (),
) -> Path:
    """Train ``config`` into the new run folder ``run_dir``; returns it (absolute)."""
    run_dir = Path(run_dir).absolute()
    with training_lock(run_dir):
        return _trained_new(config, run_dir, overwrite, callbacks)


def _trained_new(config: ExperimentConfig, run_dir: Path, overwrite: bool,
                 callbacks: Sequence[pl.Callback]) -> Path:
    held = (run_dir / "checkpoints").exists() or (run_dir / "config.yaml").exists()
    if is_first_process() and held:
        if not overwrite:
            raise PathanatError(
                f"{run_dir} already holds a run; continue it with `pathanat train --resume "
                f"{run_dir}` or pass --overwrite to start again"
            )
        shutil.rmtree(run_dir)
    config = resolve_data(config, run_dir)
    if is_first_process():
        save_config(config, run_dir / "config.yaml")
    _fit(config, run_dir, None, callbacks)
    return run_dir


def resume(
    run_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    callbacks: Sequence[pl.Callback] = (),
) -> Path:
    """Continue the run in ``run_dir`` from its last checkpoint, with the config it carries.

    Only ``trainer.*`` keys may be overridden (e.g. ``trainer.max_steps=20000`` to train longer):
    anything else would change what the checkpoint's weights mean.
    """
    run_dir = Path(run_dir).absolute()
    with training_lock(run_dir):
        return _resumed(run_dir, overrides, callbacks)


def _resumed(run_dir: Path, overrides: Sequence[str], callbacks: Sequence[pl.Callback]) -> Path:
    last = run_dir / "checkpoints" / LAST
    if not last.is_file():
        raise PathanatError(f"{run_dir}: no checkpoints/{LAST} to resume from")
    try:
        checkpoint = load_checkpoint(last)
    except PathanatError as err:
        intact = newest_intact_checkpoint(last.parent)
        if intact is None:
            raise
        raise PathanatError(
            f"{err}. The intact {intact} is beside it: copy it over {LAST} to resume from "
            f"there (cp {intact} {last})"
        ) from None
    data = to_dict(config_from_checkpoint(checkpoint))
    for item in overrides:
        if not item.startswith("trainer."):
            raise ConfigError(
                f"override '{item}': only trainer.* keys can change when resuming a run"
            )
        apply_override(data, item)
    # the folder's second_stage section, not the checkpoint's: it may be edited after training
    config = with_folder_second_stage(run_dir, from_dict(ExperimentConfig, data))
    step = int(checkpoint.get("global_step", 0))
    if step >= config.trainer.max_steps and (run_dir / "summary.json").is_file():
        # nothing to train; fitting again would only overwrite the summary with an empty one
        raise PathanatError(
            f"{run_dir}: already trained to step {step} (trainer.max_steps "
            f"{config.trainer.max_steps}); to train longer, resume with trainer.max_steps=N"
        )
    if is_first_process():
        save_config(config, run_dir / "config.yaml")
    _fit(config, run_dir, last, callbacks, resume_step=step)
    return run_dir


def training_lock(run_dir: Path) -> contextlib.AbstractContextManager:
    """Held by the first process while it trains ``run_dir`` (``.NAME.lock`` beside it): a second
    `train` or `train --resume` of the same folder stops with a message instead of writing
    checkpoints over the first's. Other DDP ranks take no lock: the first holds it for them."""
    if not is_first_process():
        return contextlib.nullcontext()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return exclusive(run_dir.with_name(f".{run_dir.name}.lock"),
                     f"{run_dir} is being trained by another process right now")


def is_first_process() -> bool:
    """Whether this is global rank 0 (before the Trainer exists: from the launcher's env)."""
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


# ---- data ---------------------------------------------------------------------------------------


def resolve_data(config: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """Make (or find) the config's slice cache; return the config with absolute data paths."""
    data = config.data
    if data.cache is not None:
        data = dataclasses.replace(data, cache=Path(data.cache).absolute())
        cache = data.cache
    else:
        cohort, cache = phantom_paths(config, run_dir)
        data = dataclasses.replace(data, data_dir=cohort.parent.parent)
        if is_first_process():
            make_phantom_cache(config, cohort, cache)
        else:
            _wait_for(cache / "manifest.json")
    made = load_cache(cache)
    shape = made.shape
    if config.model.supervised and not made.has_lesion:
        raise ConfigError(f"model.supervised: needs lesion masks, and the cache {cache} has none")
    if tuple(config.model.image_size) != tuple(shape):
        raise ConfigError(
            f"model.image_size: {list(config.model.image_size)} differs from the slices of "
            f"{cache} ({list(shape)}); set model.image_size={list(shape)}"
        )
    return dataclasses.replace(config, data=data)


def make_phantom_cache(config: ExperimentConfig, cohort: Path, cache: Path) -> None:
    """Generate and prepare the phantom unless already there (each step is all-or-nothing)."""
    from pathanat.data.phantom import generate_cohort
    from pathanat.data.prepare import prepare_cohort

    phantom, data = config.data.phantom, config.data
    # another run on the same phantom may be making it right now, or have just made it: then
    # wait for (or take) its result
    if not (cohort / "participants.tsv").is_file():
        try:
            generate_cohort(phantom.kind, phantom.subjects, cohort, seed=phantom.seed)
        except (OutputBusyError, OutputExistsError):
            _wait_for(cohort / "participants.tsv")
    if not (cache / "manifest.json").is_file():
        try:
            prepare_cohort(
                cohort, cache, shape=tuple(data.shape), n_slices=data.slices, seed=phantom.seed
            )
        except (OutputBusyError, OutputExistsError):
            _wait_for(cache / "manifest.json")


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + DATA_WAIT_S
    while not path.is_file():
        if time.monotonic() > deadline:
            raise PathanatError(f"{path}: not made by the first process within {DATA_WAIT_S:.0f} s")
        time.sleep(2.0)


def data_module(config: ExperimentConfig) -> TrainingDataModule:
    """The loaders of a resolved config (see ``resolve_data``)."""
    data = config.data
    # once resolved, a phantom's data_dir is set, so the run folder argument is not used
    cache = data.cache if data.cache is not None else phantom_paths(config, Path.cwd())[1]
    return TrainingDataModule(
        cache,
        seed=config.trainer.seed,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        flip_prob=data.flip_prob,
        intensity_scale=data.intensity_scale,
    )


# ---- the trainer --------------------------------------------------------------------------------


def build_trainer(
    config: ExperimentConfig,
    run_dir: Path,
    callbacks: Sequence[pl.Callback] = (),
    resume_step: int | None = None,
) -> pl.Trainer:
    """``resume_step``: the step of the checkpoint a resumed session starts from."""
    t = config.trainer
    checkpoints = StepCheckpoint(
        val_every=t.val_every,
        dirpath=run_dir / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every,
        save_top_k=-1,
        save_last=True,
    )
    return pl.Trainer(
        default_root_dir=run_dir,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=t.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches if t.val_batches is not None else 1.0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every,
        logger=[
            TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False),
            RunCSVLogger(run_dir, resume_step),
        ],
        callbacks=[
            checkpoints,
            ReconstructionGrid(run_dir / "figures" / "val_reconstructions.png"),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the train stream shards itself (training/data.py)
    )


def initial_pseudo_inputs(data: TrainingDataModule, k: int) -> torch.Tensor:
    """K training slices spread evenly over the split (the same on every process)."""
    data.setup()
    train = data.datasets["train"]
    index = np.linspace(0, len(train) - 1, k).round().astype(int)
    return torch.stack([train[int(i)]["image"] for i in index])


def _fit(
    config: ExperimentConfig,
    run_dir: Path,
    ckpt_path: Path | None,
    callbacks: Sequence[pl.Callback],
    resume_step: int | None = None,
) -> None:
    """Train from scratch, or from ``ckpt_path`` (a checkpoint of global step ``resume_step``)."""
    started = time.monotonic()
    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)
    module = HVAEModule(config)
    data = data_module(config)
    if config.model.vamp and ckpt_path is None:
        module.model.init_pseudo_inputs(initial_pseudo_inputs(data, config.model.pseudo_inputs))
    trainer = build_trainer(config, run_dir, callbacks, resume_step)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if trainer.state.status.value != "finished":
        return
    last = run_dir / "checkpoints" / LAST
    trainer.save_checkpoint(last, weights_only=False)  # the final state, whatever checkpoint_every
    if trainer.is_global_zero:
        write_summary(trainer, module, run_dir, time.monotonic() - started)


def write_summary(trainer: pl.Trainer, module: HVAEModule, run_dir: Path, wall_s: float) -> None:
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
    }
    summary = {
        "steps": trainer.global_step,
        "batches_seen": module.batches_seen,
        "skipped_steps": module.skipped_steps,
        "wall_s_this_session": round(wall_s, 1),
        "last_validation": {k: v for k, v in metrics.items() if math.isfinite(v)},
        "checkpoint": str(run_dir / "checkpoints" / LAST),
    }
    write_json(run_dir / "summary.json", summary)
