"""`pathanat demo`: the main job end to end on a small embedded phantom MS cohort.

Today it generates the cohort, prepares the slice cache, draws the prepared slices, trains a small
NVMP (the packaged `demo` config, configs/demo.yaml) and draws test reconstructions and prior
samples; evaluation and the report join it as they land. It says plainly what it did and did not
do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from pathanat.data.phantom import generate_cohort
from pathanat.data.prepare import load_cache, prepare_cohort
from pathanat.errors import PathanatError
from pathanat.evaluation.evaluate import reconstructions
from pathanat.evaluation.reconstruction import psnr
from pathanat.figures import save_figure, slice_montage
from pathanat.training.config import ExperimentConfig, load_experiment
from pathanat.training.run import LAST, load_trained, resume, train_config


def demo_config(cache: Path) -> ExperimentConfig:
    """The packaged `demo` experiment on ``cache`` (configs/demo.yaml: an NVMP small enough to
    train for a few minutes on 2 CPU cores; faster lr and shorter KL cycle than the paper's)."""
    return load_experiment("demo", [f"data.cache={cache}", "data.phantom=null"])


def run_demo(out: Path, n_subjects: int = 30, seed: int = 0, overwrite: bool = False) -> Path:
    """Run the demo into folder ``out``; a finished step found there is reused, not redone."""
    out = Path(out)
    cohort, cache = out / "cohort", out / "cache"
    if overwrite or not cohort.exists():
        print(f"[1/5] generating a {n_subjects}-subject MS phantom cohort (seed {seed})")
        generate_cohort("ms", n_subjects, cohort, seed=seed, overwrite=overwrite)
    else:
        _check_reusable(cohort, n_subjects, seed)
        print(f"[1/5] reusing the phantom cohort in {cohort}")
    if overwrite or not cache.exists():
        print("[2/5] preparing the slice cache (RAS, 2 mm, central 24 slices, standardised)")
        prepare_cohort(cohort, cache, seed=seed, overwrite=overwrite)
    else:
        print(f"[2/5] reusing the slice cache in {cache}")
    figure = out / "figures" / "slices.png"
    print("[3/5] drawing prepared training slices with their lesion outlines")
    save_figure(_train_montage(cache), figure)
    run = out / "run"
    steps = demo_config(cache).trainer.max_steps
    print(f"[4/5] training the demo NVMP ({steps} steps) into {run}")
    started = time.monotonic()
    _train(cache, run, overwrite)
    minutes = (time.monotonic() - started) / 60
    print("[5/5] drawing test reconstructions and prior samples; test PSNR")
    samples = out / "figures" / "reconstructions.png"
    scores = _reconstruction_figure(run, cache, samples)
    _summarise(out, cohort, cache, figure, run, samples, scores, minutes)
    return out


def _train(cache: Path, run: Path, overwrite: bool) -> None:
    """Train the demo config, or finish or reuse the run already in ``run``."""
    config = demo_config(cache)
    summary = run / "summary.json"
    finished = summary.is_file() and (
        json.loads(summary.read_text())["steps"] >= config.trainer.max_steps
    )
    if not overwrite and finished:
        print(f"      reusing the finished run in {run}")
        return
    if not overwrite and (run / "checkpoints" / LAST).is_file():
        resume(run)
    else:
        train_config(config, run, overwrite=True)


def _reconstruction_figure(run: Path, cache: Path, path: Path) -> dict[str, float]:
    """Eight test slices, their reconstructions and eight prior samples; the test-split PSNR."""
    model, _ = load_trained(run)
    test = load_cache(cache).split("test", mmap=True)
    index = np.linspace(0, len(test) - 1, 8).round().astype(int)
    x = torch.from_numpy(np.asarray(test.image[index], dtype=np.float32))[:, None]
    torch.manual_seed(0)
    with torch.no_grad():
        recon = model.reconstruct(x)[:, 0].numpy()
        samples = model.sample(8, temperature=0.8).x_mean[:, 0].numpy()
    titles = (
        [f"test input {i}" for i in range(8)]
        + [f"reconstruction {i}" for i in range(8)]
        + [f"prior sample {i} (t=0.8)" for i in range(8)]
    )
    save_figure(slice_montage([*x[:, 0].numpy(), *recon, *samples], titles=titles), path)
    return _test_psnr(model, test)


def _test_psnr(model, test) -> dict:
    """Mean per-slice PSNR (each slice's own range) of the posterior-mean reconstructions of the
    test split, over the whole slice and inside the brain mask."""
    with torch.no_grad():
        recon = reconstructions(model, test.image, batch_size=32)
    image, brain = np.asarray(test.image), np.asarray(test.brain) > 0
    has_brain = brain.any(axis=(1, 2))
    return {
        "psnr": float(psnr(image, recon).mean()),
        "psnr_brain": float(psnr(image[has_brain], recon[has_brain], mask=brain[has_brain]).mean()),
        "slices": len(image),
    }


def _check_reusable(cohort: Path, n_subjects: int, seed: int) -> None:
    made = json.loads((cohort / "phantom.json").read_text())
    if (made.get("n_subjects"), made.get("seed")) != (n_subjects, seed):
        raise PathanatError(
            f"{cohort} holds a cohort of {made.get('n_subjects')} subjects with seed "
            f"{made.get('seed')}, not {n_subjects} with seed {seed}; pass --overwrite to remake it"
        )


def _train_montage(cache_path: Path, n_subjects: int = 8, per_subject: int = 3):
    """The central and two off-centre slices of the first training subjects."""
    train = load_cache(cache_path).split("train", mmap=True)
    table = train.slices.reset_index(drop=True)
    rows, titles = [], []
    for subject in table["subject"].unique()[:n_subjects]:
        index = table.index[table["subject"] == subject].to_numpy()
        for i in index[np.linspace(0, len(index) - 1, per_subject + 2).round().astype(int)[1:-1]]:
            rows.append(i)
            titles.append(f"{subject} k={table.at[i, 'slice']}")
    lesions = None if train.lesion is None else train.lesion[rows]
    return slice_montage(train.image[rows], lesions, titles, columns=per_subject * 4)


def _summarise(
    out: Path,
    cohort: Path,
    cache_path: Path,
    figure: Path,
    run: Path,
    samples: Path,
    scores: dict[str, float],
    minutes: float,
) -> None:
    cache = load_cache(cache_path)
    counts = cache.subjects["split"].value_counts()
    slices = {s: len(cache.split(s, mmap=True)) for s in ("train", "val", "test")}
    print()
    print(f"cohort   {cohort}  (NIfTI volumes, lesion masks, participants.tsv)")
    print(
        f"cache    {cache_path}  ({cache.shape[0]} x {cache.shape[1]} slices; "
        + ", ".join(f"{s}: {counts.get(s, 0)} subjects / {slices[s]} slices" for s in slices)
        + ")"
    )
    print(f"figure   {figure}")
    print(f"run      {run}  (config.yaml, checkpoints/, metrics.csv, tensorboard/)")
    print(f"figure   {samples}  (test reconstructions, prior samples)")
    print(
        f"test     PSNR {scores['psnr']:.1f} dB (brain {scores['psnr_brain']:.1f} dB) over "
        f"{scores['slices']} slices, posterior-mean reconstructions, each slice's own range"
    )
    print()
    print(f"Done: {out} holds the phantom data and an NVMP trained on it ({minutes:.1f} min of")
    print("training). Its reconstructions follow the inputs; its prior samples, after so short a")
    print("run, show tissue texture rather than whole brains (sampling well needs the paper-length")
    print("training of configs/). Evaluation beyond PSNR (NLL, SSIM, FID, latent analyses),")
    print("synthesis and the report are not part of this demo yet.")
