"""A trained run, opened: its folder, config, model, cache, and the outputs its stages share.

Every stage (evaluate, analyze, validity, counterfactual, synthesize, reproduce) opens a run here,
so a run folder is read one way: the checkpoint decides the model and the config, and a folder
whose config.yaml describes another model stops every stage alike. This module sits below
``training`` and ``evaluation``: it imports neither.

Run folder layout (written by ``pathanat train``; the stages add their outputs beside it):

    RUN/config.yaml                 the resolved config (absolute data paths)
    RUN/checkpoints/last.ckpt       the latest state; step0001000.ckpt ... every checkpoint_every
    RUN/second_stage.pt             the second-stage prior, fitted once per checkpoint (with its
                                    detail model where the config asks for one)
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from pathanat.atomic import atomic_file, exclusive
from pathanat.config import from_dict, read_yaml, to_dict
from pathanat.data.prepare import Cache, load_cache
from pathanat.errors import ConfigError, InputError, PathanatError
from pathanat.experiment import ExperimentConfig
from pathanat.jsonfiles import read_json
from pathanat.models import HierarchicalVAE
from pathanat.models.detail import DETAIL_RECIPE, fit_detail
from pathanat.models.second_stage import (
    CALIBRATION_DRAWS,
    CODES_PER_COMPONENT,
    FIT_SLICES,
    MIXTURE_DIMS,
    SecondStagePrior,
    fit_model_second_stage,
    from_state,
    to_state,
)

LAST = "last.ckpt"
CHECKPOINT_KEY = "pathanat"  # our entry in a Lightning checkpoint: the config and loop state
SECOND_STAGE_FILE = "second_stage.pt"


# ---- checkpoints --------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (tensors and plain types only)."""
    path = Path(path)
    if not path.is_file():
        raise PathanatError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message advises weights_only=False: never
        raise PathanatError(
            f"{path}: not a pathanat checkpoint (it holds objects other than tensors and plain "
            "values; refused, since loading those can run code)"
        ) from err
    except Exception as err:  # truncated, or not a checkpoint at all: say so, not a trace
        reason = str(err).split(". ")[0]
        raise PathanatError(
            f"{path}: not a readable pathanat checkpoint ({reason}; truncated or damaged?)"
        ) from err


def config_from_checkpoint(checkpoint: dict[str, Any]) -> ExperimentConfig:
    """The experiment config a checkpoint carries."""
    if CHECKPOINT_KEY not in checkpoint:
        raise PathanatError("checkpoint: not written by `pathanat train` (no 'pathanat' entry)")
    config = checkpoint[CHECKPOINT_KEY]["config"]
    model = config.get("model") or {}
    if "posterior" not in model:
        # written before model.posterior existed, when every posterior read the image alone
        config = {**config, "model": {**model, "posterior": "encoder"}}
    return from_dict(ExperimentConfig, config)


def load_trained(path: str | os.PathLike) -> tuple[HierarchicalVAE, ExperimentConfig]:
    """The model (eval mode, CPU, float32) and config of a run folder or a checkpoint file.

    A run folder's config.yaml must describe the model its checkpoint holds: every command that
    reads a run goes through here, so a checkpoint copied into the wrong folder stops them all.
    """
    path = Path(path)
    folder = path if path.is_dir() else None
    if folder is not None:
        path = folder / "checkpoints" / LAST
    checkpoint = load_checkpoint(path)
    config = config_from_checkpoint(checkpoint)
    if folder is not None and (folder / "config.yaml").is_file():
        check_same_model(folder, config)
    model = HierarchicalVAE(config.model)
    state = {
        key.removeprefix("model."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }
    model.load_state_dict(state)
    return model.float().eval(), config


def check_same_model(folder: Path, held: ExperimentConfig) -> None:
    """Stop when the run folder's config.yaml and its checkpoint disagree about the model (on
    the keys config.yaml states: one written before a key existed does not state it)."""
    said = read_yaml(folder / "config.yaml").get("model") or {}
    has = to_dict(held.model)
    differ = [key for key in said if key in has and said[key] != has[key]]
    if differ:
        shown = "; ".join(f"model.{k}: config.yaml {said[k]!r}, checkpoint {has[k]!r}"
                          for k in differ)
        raise PathanatError(
            f"{folder}: config.yaml and checkpoints/{LAST} describe different models ({shown}); "
            "was a checkpoint copied in from another run?"
        )


# ---- where a run's data lies --------------------------------------------------------------------


def phantom_paths(config: ExperimentConfig, run_dir: Path) -> tuple[Path, Path]:
    """(cohort, cache) folders of the config's phantom; the names carry what made them."""
    data, phantom = config.data, config.data.phantom
    root = Path(data.data_dir) if data.data_dir is not None else run_dir.parent
    base = root.absolute() / f"phantom-{phantom.kind}-n{phantom.subjects}-seed{phantom.seed}"
    slices = f"-k{data.slices}" if data.slices is not None else ""
    return base / "cohort", base / f"cache-{data.shape[0]}x{data.shape[1]}{slices}"


def run_cache(run: Path, config: ExperimentConfig) -> Cache:
    """The slice cache a run was trained on (its config holds the resolved path)."""
    data = config.data
    path = data.cache if data.cache is not None else phantom_paths(config, run)[1]
    if not (Path(path) / "manifest.json").is_file():
        raise InputError(
            f"{run / 'config.yaml'}: data cache {path} is missing; it is needed to evaluate"
        )
    return load_cache(path)


def is_current(output: Path, run: Path) -> bool:
    """Whether ``output`` was written after the run folder's last checkpoint (so it describes
    it) and still reads back as JSON (a damaged one is computed again, with a warning)."""
    last = run / "checkpoints" / LAST
    if not (output.is_file() and output.stat().st_mtime >= last.stat().st_mtime):
        return False
    try:
        read_json(output)
    except InputError as err:
        print(f"warning: {err}; computing it again", file=sys.stderr, flush=True)
        return False
    return True


def run_folder(run: str | os.PathLike) -> Path:
    run = Path(run)
    if not (run / "checkpoints" / LAST).is_file():
        raise PathanatError(f"{run}: not a run folder (no checkpoints/{LAST})")
    return run.absolute()


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Run:
    """A run folder opened for its stages: ``model`` is in eval mode, on the CPU, in float32."""

    folder: Path
    config: ExperimentConfig
    model: HierarchicalVAE

    @functools.cached_property
    def cache(self) -> Cache:
        return run_cache(self.folder, self.config)

    def lesion_cache(self, scores: str) -> Cache:
        """The run's cache, which must have lesion masks (an MS cohort) for ``scores``."""
        if not self.cache.has_lesion:
            raise PathanatError(f"{self.folder}: {scores} are MS-only; its cache "
                                f"{self.cache.path} has no lesion masks (an AD cohort?)")
        return self.cache

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoints" / LAST

    def second_stage(self, seed: int = 0) -> SecondStagePrior:
        """The run's second-stage prior, fitted once per checkpoint and seed and kept in
        ``RUN/second_stage.pt``: evaluate, validity and synthesize share it (fitted in each,
        synthesize took 122 s on the cpu grid's vae_ms at 2048 training slices, 15-23 s at 864).
        A file for another checkpoint, seed or fitting recipe, or one that does not read back,
        is fitted again. With ``second_stage.detail_steps`` it carries a detail model
        (``models.detail``), fitted after the density; the file of the density alone is kept
        and the detail model added to it."""
        path = self.folder / SECOND_STAGE_FILE
        last = self.checkpoint.stat()
        key = {"checkpoint": [last.st_mtime_ns, last.st_size], "seed": seed,
               "recipe": [FIT_SLICES, MIXTURE_DIMS, CODES_PER_COMPONENT, "calibrated on val",
                          CALIBRATION_DRAWS]}
        steps = self.config.second_stage.detail_steps
        wanted = {**key, "detail": [steps, *DETAIL_RECIPE]} if steps else key
        held, prior = self._stored_second_stage(path)
        if held == wanted:
            return prior
        if isinstance(held, dict) and {k: v for k, v in held.items() if k != "detail"} == key:
            prior = replace(prior, detail=None)  # the density is current; its detail model is not
            if not steps:
                return prior  # the file keeps its detail model for a config that asks again
        else:
            prior = fit_model_second_stage(self.model, self.cache.split("train").image,
                                           self.cache.split("val").image, seed=seed)
        if steps:
            prior = fit_detail(self.model, prior, self.cache.split("train").image, steps,
                               seed=seed, progress=True)
        with atomic_file(path) as tmp:
            torch.save({"key": wanted, "prior": to_state(prior)}, tmp)
        return prior

    @staticmethod
    def _stored_second_stage(path: Path) -> tuple[dict | None, SecondStagePrior | None]:
        """The key and prior ``path`` holds; (None, None) where it is missing or unreadable."""
        if not path.is_file():
            return None, None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            return stored.get("key"), from_state(stored["prior"])
        except Exception as err:  # any damage means: fit again
            print(f"warning: {path}: unreadable ({type(err).__name__}); fitting it again",
                  file=sys.stderr, flush=True)
            return None, None


def open_run(run: str | os.PathLike) -> Run:
    """The run folder ``run`` (one holding ``checkpoints/last.ckpt``), opened."""
    folder = run_folder(run)
    model, config = load_trained(folder)
    return Run(folder, with_folder_second_stage(folder, config), model)


def with_folder_second_stage(folder: Path, config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with the second_stage section of ``folder``'s config.yaml, where it states one:
    the second stage is fitted after training, so that file (edited after training, if need be)
    decides it, not the checkpoint."""
    path = folder / "config.yaml"
    said = read_yaml(path).get("second_stage") if path.is_file() else None
    if said is None:
        return config
    try:
        return from_dict(ExperimentConfig, {**to_dict(config), "second_stage": said})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


Stage = TypeVar("Stage", bound=Callable[..., Any])


def one_at_a_time(stage: str) -> Callable[[Stage], Stage]:
    """Decorate a stage ``f(run, ...)`` that writes into a run folder: while one call runs on a
    folder, a second stops with a message (instead of both writing and the last silently
    winning, or a read-modify-write losing the other's part)."""
    def decorate(compute: Stage) -> Stage:
        @functools.wraps(compute)
        def locked(run: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
            folder = run_folder(run)
            with exclusive(folder / f".{stage}.lock",
                           f"{folder}: another `pathanat {stage}` is running on this run"):
                return compute(run, *args, **kwargs)
        return locked  # type: ignore[return-value]
    return decorate
