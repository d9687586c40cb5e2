"""The training engine: configs, run folder, metrics, resume, checkpoint safety, faults, DDP, bf16.

Everything runs on a tiny BIDS-like cohort written here (10 subjects, ellipse "brains" with a
bright round "lesion"), prepared into 32 x 32 slices once per session, and tiny models (width 8,
one cell per scale) for a handful of steps.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pathanat.cli import main
from pathanat.config import to_dict
from pathanat.data.prepare import load_cache, prepare_cohort
from pathanat.errors import ConfigError, PathanatError
from pathanat.experiment import OptimConfig, load_experiment
from pathanat.models import KINDS, HierarchicalVAE
from pathanat.runs import config_from_checkpoint, load_checkpoint, load_trained
from pathanat.training import checkpoint as checkpoint_module
from pathanat.training.checkpoint import AtomicCheckpointIO
from pathanat.training.data import ITEM, PERMUTATION, STEP, StepBatchSampler, derived_seed
from pathanat.training.module import active_units
from pathanat.training.run import resume, train

# Our checkpoints are meant to hold the state after each step's update.

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SIZE = 32


def write_bids_cohort(root: Path, n: int = 10, depth: int = 6, seed: int = 0) -> Path:
    """FLAIR-like volumes at 2 mm: an ellipse of varying size with a bright lesion disc."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.array([SIZE, SIZE, depth])
    i, j, _ = np.meshgrid(np.arange(SIZE), np.arange(SIZE), np.arange(depth), indexing="ij")
    rows = []
    for s in range(n):
        sid = f"sub-{s:04d}"
        a, b = rng.uniform(9, 13, 2)
        r = np.sqrt(((i - SIZE / 2 + 0.5) / a) ** 2 + ((j - SIZE / 2 + 0.5) / b) ** 2)
        brain = (r < 1).astype(np.uint8)
        c = rng.integers(SIZE // 2 - 5, SIZE // 2 + 5, 2)
        lesion = ((((i - c[0]) ** 2 + (j - c[1]) ** 2) < rng.uniform(2, 9)) & (brain > 0))
        image = brain * (100 + 20 * np.cos(3 * r)) + 60 * lesion + rng.normal(0, 2, r.shape)
        anat = root / sid / "anat"
        anat.mkdir(parents=True)
        for suffix, array in (
            ("FLAIR", image.astype(np.float32)),
            ("label-lesion_mask", lesion.astype(np.uint8)),
            ("desc-brain_mask", brain),
        ):
            nib.save(nib.Nifti1Image(array, affine), anat / f"{sid}_{suffix}.nii.gz")
        rows.append({"participant_id": sid, "size": a * b})
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    return root


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    return write_bids_cohort(tmp_path_factory.mktemp("training") / "cohort")


@pytest.fixture(scope="session")
def cache(cohort: Path) -> Path:
    out = cohort.parent / "cache"
    prepare_cohort(
        cohort, out, shape=(SIZE, SIZE), n_slices=4, slice_mm=2.0, progress=False, workers=1
    )
    return out


@pytest.fixture(scope="session")
def tiny_config(cache: Path) -> Path:
    """A tiny nvmp+ experiment (every logged term exists for it) on the session's cache."""
    path = cache.parent / "tiny.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            data: {{cache: {cache}, batch_size: 4}}
            model: {{kind: nvmp+, image_size: [{SIZE}, {SIZE}], width: 8, cells_per_scale: 1,
                     pseudo_inputs: 4}}
            optim: {{lr: 1.0e-3}}
            trainer: {{max_steps: 4, accelerator: cpu, log_every: 1, val_every: 2,
                       checkpoint_every: 2, progress_bar: false}}
            """
        )
    )
    return path


@pytest.fixture(scope="session")
def finished_run(tiny_config: Path, tmp_path_factory) -> Path:
    return train(tiny_config, out=tmp_path_factory.mktemp("runs") / "tiny")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


# ---- configs ----------------------------------------------------------------------------------


def test_every_config_loads_and_builds_its_model():
    paths = sorted(CONFIGS.glob("*.yaml"))
    experiments = {p.stem: load_experiment(p) for p in paths}
    paper = {k: v for k, v in experiments.items() if k != "demo"}
    # 4 kinds x {ms, ad} + the 4 z_P-supervised ms variants, plus the demo
    assert len(paper) == 12 and "demo" in experiments
    for kind in KINDS:
        for suffix in ("ms", "ad", "ms_sup"):
            config = experiments[f"{kind.replace('+', 'plus')}_{suffix}"]
            assert config.model.kind == kind
            assert config.model.supervised == suffix.endswith("sup")
            assert config.data.phantom.kind == suffix[:2]
    for name, config in paper.items():
        assert (config.optim.lr, config.optim.weight_decay) == (5e-5, 1e-8), name
        assert (config.objective.kl_cycle, config.objective.kl_start) == (10_000, 2e-7), name
        assert config.objective.kl_balance, name
        assert (config.model.levels, config.model.latent_channels) == (4, 2), name
    for name, config in experiments.items():
        model = HierarchicalVAE(config.model)
        out = model(torch.randn(2, 1, *config.model.image_size))
        assert len(out.groups) == 5, name
        assert (out.seg_logits is not None) == config.model.supervised, name


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.widht=8", "model.widht"),
        ("trainer.max_steps=many", "trainer.max_steps"),
        ("optim.lr=[1]", "optim.lr"),
        ("trainer.precision=16", "trainer.precision"),
        ("data.batch_size=0", "data.batch_size"),
        ("optim.lr=0", "optim.lr: expected a value in (0, 1]"),
        ("optim.lr=1e300", "optim.lr: expected a value in (0, 1]"),
        ("optim.lr=.inf", "optim.lr: expected a finite number"),
        ("optim.weight_decay=-1e-8", "optim.weight_decay"),
        ("data.flip_prob=1.5", "data.flip_prob"),
        ("data.intensity_scale=-0.1", "data.intensity_scale"),
        ("objective.kl_scale=0", "objective.kl_scale: expected a value > 0"),
        ("objective.kl_group_scale=[1,4]", r"objective.kl_group_scale: expected 5 values > 0"),
        ("objective.kl_group_scale=[1,1,1,1,0]", "objective.kl_group_scale: expected 5"),
        ("model.conditional_prior=fitted", "model.conditional_prior"),
        ("data.phantom={kind: ms}", "data.cache"),  # a cache and a phantom: which one?
    ],
)
def test_bad_keys_and_types_are_rejected_with_the_key_named(tiny_config, override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_experiment(tiny_config, [override])


def test_cli_train_reports_a_config_typo_by_key(tiny_config, tmp_path, capsys):
    assert main(["train", str(tiny_config), "model.kidn=vae", "--out", str(tmp_path / "r")]) == 2
    assert "model.kidn" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ---- run folder and metrics -------------------------------------------------------------------


def test_run_folder_holds_config_checkpoints_logs_metrics_and_figure(finished_run):
    run = finished_run
    for name in ("config.yaml", "metrics.csv", "summary.json", "figures/val_reconstructions.png"):
        assert (run / name).is_file(), name
    assert {p.name for p in (run / "checkpoints").iterdir()} == {
        "last.ckpt", "step0000002.ckpt", "step0000004.ckpt"
    }
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert load_experiment(run / "config.yaml").data.cache.is_absolute()

    metrics = pd.read_csv(run / "metrics.csv")
    expected = {
        "train/loss", "train/nll_per_dim", "train/kl_per_dim", "train/kl_extra", "train/kl_weight",
        "train/grad_norm", "train/skipped_steps", "val/psnr", "val/psnr_brain", "val/elbo_per_dim",
        *(f"{m}/group_{g}" for m in ("kl", "balance", "active_units") for g in range(5)),
    }
    assert expected <= set(metrics.columns)
    train_rows = metrics.dropna(subset=["train/loss"])
    assert train_rows["step"].tolist() == [0, 1, 2, 3]
    # the paper's cyclical schedule from 2e-7, rising over the first half of a 10 000-step cycle
    truth = [2e-7 + (1 - 2e-7) * s / 5000 for s in range(4)]
    np.testing.assert_allclose(train_rows["train/kl_weight"], truth, rtol=1e-6)
    # balancing coefficients have mean 1 while the KL weight is below 1
    coefficients = train_rows[[f"balance/group_{g}" for g in range(5)]].to_numpy()
    np.testing.assert_allclose(coefficients.mean(1), 1.0, rtol=1e-5)
    assert (train_rows["train/skipped_steps"] == 0).all()
    val = metrics.dropna(subset=["val/psnr"])
    assert val["step"].tolist() == [1, 3] and np.isfinite(val["val/psnr_brain"]).all()


def test_active_units_count_units_whose_posterior_mean_varies_over_the_batch():
    # 3 units per sample: constant (inactive), variance 0.005 (inactive), variance 1 (active)
    mu = torch.stack(
        [torch.zeros(6), torch.tensor([0.1, -0.1] * 3) * math.sqrt(0.5 * 6 / 5), torch.arange(6.0)],
        dim=1,
    ).view(6, 3, 1, 1)
    group = SimpleNamespace(posterior=SimpleNamespace(mu=mu))
    fractions = active_units(SimpleNamespace(groups=[group, group]))
    assert torch.allclose(fractions, torch.tensor([1 / 3, 1 / 3]))


# ---- data order -------------------------------------------------------------------------------


def test_train_stream_is_a_function_of_the_batch_number_and_shards_replicas():
    def take(sampler, n):
        stream = iter(sampler)
        return [[index for _, index in next(stream)] for _ in range(n)]

    straight = take(StepBatchSampler(20, 3, seed=5), 14)  # 6 batches per epoch
    assert take(StepBatchSampler(20, 3, seed=5, start=7), 7) == straight[7:]
    for epoch in (0, 1):
        seen = {i for batch in straight[6 * epoch : 6 * epoch + 6] for i in batch}
        assert len(seen) == 18  # each epoch: a permutation, last partial batch dropped
    rank0 = {i for batch in take(StepBatchSampler(20, 3, 5, rank=0, world=2), 3) for i in batch}
    rank1 = {i for batch in take(StepBatchSampler(20, 3, 5, rank=1, world=2), 3) for i in batch}
    assert len(rank0) == len(rank1) == 9 and not rank0 & rank1


# ---- resume -----------------------------------------------------------------------------------


def test_resume_continues_exactly(tiny_config, tmp_path):
    """2N steps straight == N steps, then `train --resume` for N more (N = 3), with augmentation
    on, so the data order, the augmentation draws and the reparameterisation noise must all be
    restored. Tolerance: 1e-6 absolute on every weight (CPU, same threads; we observe 0)."""
    common = ["trainer.val_every=100", "trainer.checkpoint_every=100", "data.flip_prob=0.5",
              "data.intensity_scale=0.1"]
    straight = train(tiny_config, [*common, "trainer.max_steps=6"], out=tmp_path / "straight")
    split = train(tiny_config, [*common, "trainer.max_steps=3"], out=tmp_path / "split")
    # a second_stage section edited between the sessions (it is fitted after training) stays
    saved = split / "config.yaml"
    saved.write_text(saved.read_text().replace("detail_steps: 0", "detail_steps: 7"))
    assert main(["train", "--resume", str(split), "trainer.max_steps=6"]) == 0
    assert load_experiment(saved).second_stage.detail_steps == 7
    a, b = weights(straight / "checkpoints/last.ckpt"), weights(split / "checkpoints/last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert load_checkpoint(split / "checkpoints/last.ckpt")["global_step"] == 6
    # both sessions' metrics are in the one CSV
    assert pd.read_csv(split / "metrics.csv").dropna(subset=["train/loss"])["step"].tolist() == [
        0, 1, 2, 3, 4, 5
    ]


KILLED_SCRIPT = """
import os, sys
import lightning.pytorch as pl
from pathanat.training.run import train

class Kill(pl.Callback):  # dies as kill -9 would: no teardown, no flush
    def __init__(self, where):
        self.where = where
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.where == "step 5":
            if trainer.global_step == 5:
                os._exit(9)
    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if self.where == "validation at step 4" and trainer.global_step == 4:
            os._exit(9)

train(sys.argv[1], ["trainer.max_steps=6", "trainer.val_every=2", "trainer.checkpoint_every=2",
                    "trainer.log_every=1"], out=sys.argv[2], callbacks=[Kill(sys.argv[3])])
"""


@pytest.mark.parametrize("where", ["step 5", "validation at step 4"])
def test_a_killed_and_resumed_run_logs_every_step_once_as_an_unbroken_one(
    tiny_config, tmp_path, where
):
    """Killed after the checkpoint of step 4 (mid-training, or during the validation that follows
    it), then resumed: metrics.csv holds the rows of a run never stopped, each once (Lightning's
    order lost the validation and repeated the rows logged after the checkpoint)."""
    common = ["trainer.val_every=2", "trainer.checkpoint_every=2", "trainer.log_every=1"]
    straight = train(tiny_config, [*common, "trainer.max_steps=6"], out=tmp_path / "straight")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT)
    killed = tmp_path / "killed"
    done = subprocess.run([sys.executable, str(script), str(tiny_config), str(killed), where],
                          capture_output=True, text=True)
    assert done.returncode == 9, done.stderr[-2000:]
    assert main(["train", "--resume", str(killed), "trainer.max_steps=6"]) == 0
    a, b = pd.read_csv(straight / "metrics.csv"), pd.read_csv(killed / "metrics.csv")
    for column in ("train/loss", "val/psnr"):
        rows_a, rows_b = a.dropna(subset=[column]), b.dropna(subset=[column])
        assert rows_b["step"].tolist() == rows_a["step"].tolist(), column
        np.testing.assert_allclose(rows_b[column], rows_a[column], rtol=1e-5, err_msg=column)
    assert a.dropna(subset=["val/psnr"])["step"].tolist() == [1, 3, 5]


def test_warm_up_schedules_follow_the_step_and_survive_a_resume(tiny_config, tmp_path):
    """A KL cycle of 4 steps (rise over 2, restart at 4), a 3-step lr warm-up and a cosine decay
    to 0 at step 5, on a joint-posterior model with per-scale widths: the logged values are the
    schedules', and 2 + 3 resumed steps equal 5 straight ones."""
    common = ["objective.kl_cycle=4", "optim.warmup_steps=3", "optim.lr_decay=cosine",
              "model.posterior=joint",
              "model.widths=[16,16,8,8,8]", "model.cells=[2,1,1,1,0]", "trainer.val_every=100",
              "trainer.checkpoint_every=100"]
    straight = train(tiny_config, [*common, "trainer.max_steps=5"], out=tmp_path / "straight")
    split = train(tiny_config, [*common, "trainer.max_steps=2"], out=tmp_path / "split")
    assert main(["train", "--resume", str(split), "trainer.max_steps=5"]) == 0
    a, b = weights(straight / "checkpoints/last.ckpt"), weights(split / "checkpoints/last.ckpt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    rows = pd.read_csv(split / "metrics.csv").dropna(subset=["train/loss"])
    np.testing.assert_allclose(rows["train/kl_weight"], [2e-7, 0.5 + 1e-7, 1, 1, 2e-7], rtol=1e-6)
    # after the warm-up, half a cosine over the 2 remaining steps: 1e-3 * (1 + cos(pi * k / 2)) / 2
    np.testing.assert_allclose(rows["train/lr"], [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 5e-4],
                               rtol=1e-6)


def test_cosine_decay_reaches_zero_at_the_last_step_and_never_rises():
    optim = OptimConfig(lr=1e-3, warmup_steps=10, lr_decay="cosine")
    lrs = [optim.learning_rate(step, 110) for step in range(111)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(5e-4) and lrs[110] == pytest.approx(0.0, abs=1e-12)
    assert all(b <= a for a, b in itertools.pairwise(lrs[10:]))
    assert OptimConfig(lr=1e-3).learning_rate(10**6, 10) == 1e-3  # the paper's constant lr
    # decay_steps fixes the end whatever max_steps a piece of the run has
    pieces = OptimConfig(lr=1e-3, warmup_steps=10, lr_decay="cosine", decay_steps=110)
    assert [pieces.learning_rate(s, 20) for s in (15, 60)] == [lrs[15], lrs[60]]


def test_decay_steps_must_end_after_the_warm_up(tiny_config):
    with pytest.raises(ConfigError, match=r"optim\.decay_steps: expected more than"):
        load_experiment(tiny_config, ["optim.warmup_steps=10", "optim.decay_steps=10"])


def test_a_checkpoint_from_before_model_posterior_loads_with_the_encoder_posterior(finished_run):
    checkpoint = load_checkpoint(finished_run / "checkpoints/last.ckpt")
    assert config_from_checkpoint(checkpoint).model.posterior == "joint"
    del checkpoint["pathanat"]["config"]["model"]["posterior"]
    assert config_from_checkpoint(checkpoint).model.posterior == "encoder"


def test_resume_accepts_only_trainer_overrides(finished_run):
    with pytest.raises(ConfigError, match="only trainer"):
        resume(finished_run, ["model.kind=vae"])


def test_a_finished_run_is_not_overwritten_by_accident(tiny_config, finished_run):
    with pytest.raises(PathanatError, match="--resume"):
        train(tiny_config, out=finished_run)


# ---- checkpoint safety -------------------------------------------------------------------------


def test_checkpoints_hold_only_tensors_and_plain_types(finished_run):
    path = finished_run / "checkpoints/last.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # raises on anything else pickled

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool, torch.Tensor))

    assert plain(checkpoint)
    model, config = load_trained(finished_run)
    assert config.model.kind == "nvmp+" and isinstance(model, HierarchicalVAE)


def test_a_checkpoint_in_a_folder_whose_config_describes_another_model_is_refused(
    finished_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["model"]["posterior"]  # as a config.yaml written before the key existed
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    load_trained(run)  # what it does not state is not a disagreement
    config["model"]["kind"] = "vae"  # as if a vae's checkpoint had been copied into this folder
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(PathanatError, match=r"model\.kind: config.yaml 'vae', checkpoint 'nvmp\+'"):
        load_trained(run)
    assert load_trained(run / "checkpoints" / "last.ckpt")[1].model.kind == "nvmp+"  # the file


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_damaged_last_checkpoint_is_refused_and_the_intact_step_checkpoint_offered(
    finished_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    last = run / "checkpoints" / "last.ckpt"
    os.truncate(last, 1000)  # a copy that stopped, a full disk
    with pytest.raises(PathanatError) as err:
        resume(run)
    message = str(err.value)
    assert "last.ckpt: not a readable pathanat checkpoint" in message
    assert "step0000004.ckpt is beside it" in message and "weights_only" not in message
    torch.save({"state_dict": _Payload()}, last)  # a foreign pickle under the name
    with pytest.raises(PathanatError, match="refused, since loading those can run code") as err:
        resume(run)
    assert "weights_only" not in str(err.value)
    for step in (run / "checkpoints").glob("step*.ckpt"):
        step.unlink()
    with pytest.raises(PathanatError) as err:  # nothing intact: no offer
        resume(run)
    assert "beside it" not in str(err.value)


def test_a_failed_checkpoint_write_leaves_the_last_checkpoint_readable(
    finished_run, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    last = run / "checkpoints" / "last.ckpt"
    before = weights(last)
    real_save = torch.save

    def dies_midway(obj, path):  # write half of the bytes, then fail as a kill would
        real_save(obj, path)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_midway)
    # the resumed run's first checkpoint write (step 6) fails and stops the run
    with pytest.raises(OSError, match="disk full"):
        resume(run, ["trainer.max_steps=8"])
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    after = weights(last)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in (run / "checkpoints").iterdir() if "tmp" in p.name]
    # and the direct path: a failed save raises and keeps the destination
    with pytest.raises(OSError):
        monkeypatch.setattr(checkpoint_module.torch, "save", dies_midway)
        AtomicCheckpointIO().save_checkpoint({"x": torch.ones(3)}, last)
    assert torch.equal(weights(last)[next(iter(before))], before[next(iter(before))])


# ---- faults -----------------------------------------------------------------------------------


class Inject(pl.Callback):
    """Poison chosen batches (NaN pixel) or gradients (NaN hook), and record the weights."""

    def __init__(self, nan_batches=(), nan_grad_batches=()) -> None:
        self.nan_batches, self.nan_grad_batches = set(nan_batches), set(nan_grad_batches)
        self.records: list[dict] = []
        self._hook = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._before = {k: v.clone() for k, v in module.state_dict().items()}
        self._step, self._skipped = trainer.global_step, module.skipped_steps
        if batch_idx in self.nan_batches:
            batch["image"][0, 0, 0, 0] = float("nan")
        if batch_idx in self.nan_grad_batches:
            param = module.model.decoder.out.weight
            self._hook = param.register_hook(lambda g: g * float("nan"))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        after = module.state_dict()
        self.records.append(
            {
                "batch": batch_idx,
                "unchanged": all(torch.equal(self._before[k], after[k]) for k in after),
                "finite": all(torch.isfinite(v).all() for v in after.values()),
                "steps": trainer.global_step - self._step,
                "skips": module.skipped_steps - self._skipped,
            }
        )


def test_non_finite_loss_or_gradient_is_skipped_and_counted(tiny_config, tmp_path):
    inject = Inject(nan_batches={1}, nan_grad_batches={3})
    run = train(tiny_config, ["trainer.max_steps=4", "trainer.val_every=100"],
                out=tmp_path / "r", callbacks=[inject])
    by_batch = {r["batch"]: r for r in inject.records}
    for bad in (1, 3):
        assert by_batch[bad] | {"batch": 0} == {
            "batch": 0, "unchanged": True, "finite": True, "steps": 0, "skips": 1
        }
    for good in (0, 2, 4, 5):
        assert not by_batch[good]["unchanged"] and by_batch[good]["steps"] == 1
    assert len(inject.records) == 6  # 4 applied steps took 6 batches
    metrics = pd.read_csv(run / "metrics.csv").dropna(subset=["train/skipped_steps"])
    assert metrics["train/skipped_steps"].iloc[-1] == 2
    assert load_checkpoint(run / "checkpoints/last.ckpt")["pathanat"]["skipped_steps"] == 2


def test_too_many_skips_in_a_row_stop_the_run_with_its_last_good_checkpoint(tiny_config, tmp_path):
    inject = Inject(nan_batches=range(2, 100))
    with pytest.raises(PathanatError, match="max_consecutive_skips"):
        train(tiny_config, ["trainer.max_steps=10", "trainer.max_consecutive_skips=3",
                            "trainer.val_every=100"], out=tmp_path / "r", callbacks=[inject])
    # the third skip in a row raises inside its step, so only two skipped steps completed
    assert [r["skips"] for r in inject.records] == [0, 0, 1, 1]
    last = load_checkpoint(tmp_path / "r/checkpoints/last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


class PoisonUpdate(pl.Callback):
    """Make the optimiser's update of batch ``at`` leave one weight infinite (a finite gradient
    cannot, so the step itself is patched)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx != self.at:
            return
        optimizer = module.optimizers().optimizer
        real_step = optimizer.step

        def step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            with torch.no_grad():
                module.model.decoder.out.weight[0, 0, 0, 0] = float("inf")
            return out

        optimizer.step = step


def test_an_update_that_makes_weights_non_finite_stops_the_run_before_it_is_saved(
    tiny_config, tmp_path
):
    with pytest.raises(PathanatError, match="non-finite"):
        train(tiny_config, ["trainer.max_steps=6", "trainer.checkpoint_every=2",
                            "trainer.val_every=100"], out=tmp_path / "r",
              callbacks=[PoisonUpdate(at=3)])
    last = load_checkpoint(tmp_path / "r/checkpoints/last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_derived_seeds_of_different_purposes_or_key_counts_differ():
    # SeedSequence alone gives [7, 3] and [7, 3, 0] one state: batch 3's step noise would
    # equal epoch 3's permutation
    seeds = {derived_seed(purpose, *keys) for purpose in (PERMUTATION, ITEM, STEP)
             for keys in ((7, 3), (7, 3, 0), (7, 3, 0, 0))}
    assert len(seeds) == 9
    assert derived_seed(STEP, 7, 3) == derived_seed(STEP, 7, 3)


# ---- precision and scale ------------------------------------------------------------------------


def test_bf16_mixed_with_channels_last_trains(tiny_config, tmp_path):
    run = train(tiny_config, ["trainer.max_steps=2", "trainer.precision=bf16-mixed",
                              "model.kind=nvae"], out=tmp_path / "r")
    metrics = pd.read_csv(run / "metrics.csv").dropna(subset=["train/loss"])
    assert np.isfinite(metrics["train/loss"]).all() and (metrics["train/skipped_steps"] == 0).all()
    _, config = load_trained(run)
    assert config.trainer.use_channels_last and config.trainer.precision == "bf16-mixed"


DDP_SCRIPT = """
import sys, torch
import lightning.pytorch as pl
from pathanat.training.run import train

class Dump(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.first = self.__dict__.get("first", batch["image"].clone())
    def on_train_end(self, trainer, module):
        backend = torch.distributed.get_backend()
        torch.save({"state": module.state_dict(), "first": self.first, "backend": backend},
                   f"{sys.argv[2]}/rank{trainer.global_rank}.pt")

train(sys.argv[1], ["trainer.max_steps=3", "trainer.devices=2", "trainer.strategy=ddp",
                    "trainer.val_every=100", "model.kind=nvmp"],
      out=f"{sys.argv[2]}/run", callbacks=[Dump()])
"""


def test_ddp_on_two_cpu_processes_keeps_replicas_identical(tiny_config, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_config), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["backend"] == r1["backend"] == "gloo"
    assert not torch.equal(r0["first"], r1["first"])  # each replica read its own shard
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == 3


# ---- data made from a phantom config -------------------------------------------------------------


def test_a_phantom_named_by_the_config_is_made_once_and_reused(
    cohort, tiny_config, tmp_path, monkeypatch
):
    calls = []

    def fake_generate(kind, n_subjects, out_dir, seed=0, **kwargs):
        calls.append((kind, n_subjects, seed))
        shutil.copytree(cohort, out_dir)
        return out_dir

    monkeypatch.setattr("pathanat.data.phantom.generate_cohort", fake_generate)
    overrides = ["data.cache=null", "data.phantom={kind: ms, subjects: 10, seed: 3}",
                 f"data.shape=[{SIZE}, {SIZE}]", "data.slices=4", "trainer.max_steps=1"]
    first = train(tiny_config, overrides, out=tmp_path / "runs/a")
    second = train(tiny_config, overrides, out=tmp_path / "runs/b")
    assert calls == [("ms", 10, 3)]
    made = tmp_path / "runs/phantom-ms-n10-seed3"
    assert load_cache(made / f"cache-{SIZE}x{SIZE}-k4").shape == (SIZE, SIZE)
    for run in (first, second):
        assert load_experiment(run / "config.yaml").data.data_dir == made.parent
    assert to_dict(load_experiment(first / "config.yaml")) == to_dict(
        load_experiment(second / "config.yaml")
    )


def test_the_demo_trains_the_packaged_demo_config(tmp_path):
    from pathanat.demo import demo_config

    config = demo_config(tmp_path)
    assert config.data.cache == tmp_path and config.data.phantom is None
    shipped = load_experiment(CONFIGS / "demo.yaml")
    assert to_dict(config.model) == to_dict(shipped.model)
    assert to_dict(config.trainer) == to_dict(shipped.trainer)


def test_a_packaged_config_loads_by_name_and_a_wrong_name_lists_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the name must come from the package
    assert load_experiment("nvmp_ms").model.kind == "nvmp"
    assert load_experiment("nvmpplus_ms.yaml").model.kind == "nvmp+"
    with pytest.raises(ConfigError, match=r"nvmp_mss.*packaged: .*nvmp_ms"):
        load_experiment("nvmp_mss")


def test_a_run_waits_for_the_phantom_another_run_is_making(tmp_path):
    from pathanat.training.run import make_phantom_cache

    config = load_experiment("demo")
    cohort, cache = tmp_path / "cohort", tmp_path / "cache"
    maker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from pathanat.atomic import atomic_dir
        with atomic_dir({str(cohort)!r}) as tmp:
            print("making", flush=True)
            time.sleep(3)
            (tmp / "participants.tsv").write_text("participant_id\\n")
            Path({str(cache)!r}).mkdir()  # a stand-in cache, there before the cohort is
            Path({str(cache)!r}, "manifest.json").write_text("{{}}")
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert maker.stdout.readline().strip() == "making"
        make_phantom_cache(config, cohort, cache)  # its own would be 30 subjects, not this one
        assert (cohort / "participants.tsv").read_text() == "participant_id\n"
    finally:
        maker.kill()
        maker.wait()


def test_resuming_a_finished_run_changes_nothing_and_says_how_to_train_longer(
    finished_run, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(PathanatError, match=r"already trained to step 4 .*trainer\.max_steps=N"):
        resume(run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
