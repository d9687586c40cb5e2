from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
# The tests' tensors are small: one thread is as fast, deterministic, and does not oversubscribe
# the cores when a test starts worker or DDP processes of its own.
torch.set_num_threads(1)

TINY_SHAPE = (48, 48)


def make_tiny_run(root: Path) -> Path:
    """A 10-subject MS phantom (6/2/2 subjects, 4 slices of 48 x 48 at 4 mm) under ``root`` and
    an nvmp model of width 8 trained for 6 steps on it; returns the run folder."""
    from pathanat.data.phantom import generate_cohort
    from pathanat.data.prepare import prepare_cohort
    from pathanat.experiment import DataConfig, ExperimentConfig, TrainerConfig
    from pathanat.models import HVAEConfig
    from pathanat.training.run import train_config

    cohort = generate_cohort("ms", 10, root / "cohort", seed=1, slab_mm=16.0, progress=False)
    cache = prepare_cohort(cohort, root / "cache", in_plane_mm=4.0, n_slices=4, shape=TINY_SHAPE,
                           progress=False, workers=1)
    config = ExperimentConfig(
        data=DataConfig(cache=cache, shape=TINY_SHAPE, batch_size=8),
        model=HVAEConfig(kind="nvmp", image_size=TINY_SHAPE, width=8, cells_per_scale=1,
                         pseudo_inputs=4),
        trainer=TrainerConfig(max_steps=6, accelerator="cpu", log_every=2, val_every=6,
                              checkpoint_every=6, progress_bar=False),
    )
    config.optim.lr = 2e-3
    return train_config(config, root / "run")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny trained run the evaluation tests share (``make_tiny_run``): read it, do not
    damage it."""
    return make_tiny_run(tmp_path_factory.mktemp("tiny-phantom-run"))
