"""Sample validity: how many lesion-like voxels of an MS model's prior samples lie where no lesion
can be (the paper's Figure 1a, made measurable on the phantom).

Definition. A voxel is *lesion-like* when the cohort's lesion segmenter gives it a probability
above 0.5; it is *invalid* when the cohort's tissue segmenter labels it background, CSF or
ventricles (MS lesions sit in white matter; the phantom puts them in WM only). The rate is
invalid / lesion-like voxels pooled over all slices, with a 95% percentile bootstrap over slices.

The rates, all on the same definition:

- ``samples``: N prior samples (the likelihood mean of each draw, at the given temperature),
  segmented by both segmenters; given the training split's brain masks, only the samples that
  pass the brain-shape test (``plausibility``) are counted -- lesion-like voxels in a field of
  noise say nothing about where a model puts lesions in a brain -- and ``brain_like`` gives the
  fraction of samples counted (``all_samples``: the rate over every sample);
- ``second_stage``: where the run has a second-stage prior (``models.second_stage``), its N
  draws scored as the prior samples are, brain-like ones only -- the draws that look like brains;
- ``real``: the real test slices segmented the same way: the reference rate, which the
  segmenters' own errors (a lesion edge next to a ventricle) keep above zero;
- ``reconstructions``: the model's reconstructions of those slices (likelihood means of their
  posterior means), segmented the same way: the rate of a decoded image whose anatomy and lesions
  are real ones -- the floor for a model's draws, which are decoded images too (smoother than
  real slices, with fainter lesion edges);
- ``truth``: the test slices' ground-truth lesion masks on the ground-truth tissue labels: zero
  by construction of the phantom, a check of the definition.

``per_label`` gives the share of lesion-like voxels on each tissue label (GM is not counted
invalid, but a model that paints lesions on the cortex shows there).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.colors import ListedColormap

from pathanat.data.phantom import BACKGROUND, CSF, VENTRICLES
from pathanat.data.prepare import CacheSplit
from pathanat.defaults import DEFAULT_BATCH_SIZE, SEED, TEMPERATURE, VALIDITY_SAMPLES
from pathanat.errors import InputError, PathanatError, checked_int
from pathanat.evaluation.evaluate import (
    as_input,
    batches,
    prior_samples,
    second_stage_samples,
    split_arrays,
)
from pathanat.evaluation.plausibility import (
    References,
    brain_like,
    brain_references,
    wilson_interval,
)
from pathanat.evaluation.segmenters import (
    LESION_THRESHOLD,
    TISSUE_LABELS,
    Segmenters,
    cohort_segmenters,
    segment,
)
from pathanat.evaluation.segmenters import (
    STEPS as SEGMENTER_STEPS,
)
from pathanat.figures import WINDOW, display, save_figure
from pathanat.jsonfiles import finite_or_none, write_json
from pathanat.models.second_stage import SecondStagePrior
from pathanat.runs import one_at_a_time, open_run

INVALID = (BACKGROUND, CSF, VENTRICLES)
DEFINITION = (
    f"a voxel is lesion-like when the lesion segmenter's probability exceeds {LESION_THRESHOLD}; "
    "it is invalid when the tissue segmenter labels it background, CSF or ventricles"
)
BOOTSTRAP = 2000
CONFIDENCE = 0.95
VALIDITY_JSON = "validity.json"
FIGURE = "figures/sample_validity.png"
FIGURE_SAMPLES = 16
FIGURE_REAL = 8
INVALID_COLOUR = ListedColormap(["cyan"])


def validity_rates(lesion: np.ndarray, tissue: np.ndarray, seed: int = 0) -> dict:
    """RATES of lesion voxels ``lesion`` (N, H, W) bool on tissue labels ``tissue`` (N, H, W):
    the pooled invalid fraction, its bootstrap interval over slices and the share per label."""
    lesion = np.asarray(lesion, dtype=bool)
    tissue = np.asarray(tissue)
    if lesion.shape != tissue.shape or lesion.ndim != 3:
        raise ValueError(f"lesion {lesion.shape} and tissue {tissue.shape}: expected (N, H, W)")
    found = lesion.sum(axis=(1, 2))
    invalid = (lesion & np.isin(tissue, INVALID)).sum(axis=(1, 2))
    total = int(found.sum())
    counts = np.bincount(tissue[lesion].ravel(), minlength=len(TISSUE_LABELS))
    low = high = None
    if total:
        # Slices are the sampling unit (voxels of one slice are not independent): resample them.
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(found), (BOOTSTRAP, len(found)))
        totals = found[idx].sum(axis=1)
        kept = totals > 0
        ratios = invalid[idx].sum(axis=1)[kept] / totals[kept]
        tail = 100 * (1 - CONFIDENCE) / 2
        low, high = (float(v) for v in np.percentile(ratios, [tail, 100 - tail]))
    return {
        "n": len(found),
        "lesion_voxels": total,
        "invalid_voxels": int(invalid.sum()),
        "invalid_fraction": float(invalid.sum() / total) if total else None,
        "ci_low": low,
        "ci_high": high,
        "slices_with_lesions": int((found > 0).sum()),
        "per_label": {name: float(counts[k] / total) if total else None
                      for k, name in enumerate(TISSUE_LABELS)},
    }


@torch.no_grad()
@torch.no_grad()
def reconstructed_slices(model: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, H, W) float32: ``model.reconstruct`` of ``images`` (N, H, W), in batches."""
    return np.concatenate([model.reconstruct(as_input(images[p]))[:, 0].float().numpy()
                           for p in batches(len(images), batch_size)])


def brain_like_rates(scored: Scored, references: References | None, seed: int
                     ) -> tuple[dict, dict | None]:
    """The invalid-lesion rates over the brain-like images of ``scored`` (all of them without
    ``references``) and the brain-like fraction with its Wilson interval."""
    if references is None:
        return validity_rates(scored.lesion, scored.tissue, seed), None
    ok, *_ = brain_like(scored.images, references)
    low, high = wilson_interval(int(ok.sum()), len(ok))
    shape = {"mean": float(ok.mean()), "ci_low": low, "ci_high": high, "n": len(ok)}
    return validity_rates(scored.lesion[ok], scored.tissue[ok], seed), shape


@dataclass
class Scored:
    """What the figure shows: images with their lesion masks and tissue labels."""

    images: np.ndarray
    lesion: np.ndarray
    tissue: np.ndarray


def segmented(segmenters: Segmenters, images: np.ndarray, batch_size: int) -> Scored:
    """``images`` (N, H, W) with the segmenters' lesion maps and tissue labels."""
    tissue, probs = segment(segmenters, images, batch_size)
    return Scored(images, probs > LESION_THRESHOLD, tissue)


def scored_validity(
    model: Any,
    segmenters: Segmenters,
    test: CacheSplit,
    n: int,
    temperature: float,
    seed: int,
    batch_size: int,
    references: References | None = None,
    second_stage: SecondStagePrior | None = None,
) -> tuple[dict, Scored, Scored | None, Scored]:
    """``sample_validity``'s result and the segmented prior samples, second-stage draws (None
    without ``second_stage``) and real slices behind it. ``second_stage``: its ``n`` draws are
    scored the same way, under "second_stage"."""
    _check_validity_arguments(n, temperature, batch_size, test)
    seconds = {}
    start = time.perf_counter()
    # fork_rng: the seed fixes the draws without changing the caller's RNG state
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        images = prior_samples(model, n, None, batch_size, float(temperature))
    seconds["sampling"] = time.perf_counter() - start
    _check_draws(images, test)

    start = time.perf_counter()
    samples = segmented(segmenters, images, batch_size)
    real_images = np.array(test.image, dtype=np.float32)
    real = segmented(segmenters, real_images, batch_size)
    rebuilt = segmented(segmenters, reconstructed_slices(model, real_images, batch_size),
                        batch_size)
    seconds["segmentation"] = time.perf_counter() - start
    reconstructed = validity_rates(rebuilt.lesion, rebuilt.tissue, seed)

    everything = validity_rates(samples.lesion, samples.tissue, seed)
    counted, shape = brain_like_rates(samples, references, seed)
    staged, drawn = None, None
    if second_stage is not None:
        start = time.perf_counter()
        staged, drawn = second_stage_validity(model, second_stage, segmenters, n, test,
                                              batch_size, references, seed)
        seconds["second_stage"] = time.perf_counter() - start
    result = {
        "split": test.name,
        "seed": seed,
        "temperature": float(temperature),
        "definition": DEFINITION,
        "invalid_labels": [TISSUE_LABELS[k] for k in INVALID],
        "samples": counted,
        "brain_like": shape,
        "all_samples": everything,
        "second_stage": staged,
        "real": validity_rates(real.lesion, real.tissue, seed),
        "reconstructions": reconstructed,
        "truth": validity_rates(np.asarray(test.lesion, dtype=bool), np.asarray(test.dseg), seed),
        "segmenters": segmenter_summary(segmenters),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    return finite_or_none(result), samples, drawn, real



def _check_validity_arguments(n: int, temperature: float, batch_size: int,
                              test: CacheSplit) -> None:
    checked_int(n, "n", what="prior samples")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)
            and temperature > 0):
        raise PathanatError(f"temperature: expected a positive number, got {temperature!r}")
    checked_int(batch_size, "batch_size")
    if test.lesion is None or test.dseg is None:
        raise InputError(
            f"split {test.name!r}: sample validity needs ground-truth lesion masks and dseg "
            "labels (an MS phantom cache); this split has "
            + ("no lesion masks" if test.lesion is None else "no dseg")
        )


def _check_draws(images: np.ndarray, test: CacheSplit) -> None:
    if images.shape[1:] != test.image.shape[1:]:
        raise PathanatError(
            f"the model draws {images.shape[1]} x {images.shape[2]} samples; the test split's "
            f"slices are {test.image.shape[1]} x {test.image.shape[2]}"
        )
    if not np.isfinite(images).all():
        raise PathanatError("the model drew samples with NaN or infinite values")


def second_stage_validity(
    model: Any, second_stage: SecondStagePrior, segmenters: Segmenters, n: int,
    test: CacheSplit, batch_size: int, references: References | None, seed: int,
) -> tuple[dict, Scored]:
    """Invalid-lesion rates of ``n`` second-stage draws (brain-like ones) and their shape, and
    the segmented draws."""
    # fork_rng: the seed fixes the draws without changing the caller's RNG state
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        drawn = second_stage_samples(model, second_stage, n, tuple(test.image.shape[1:]),
                                     batch_size)
    scored = segmented(segmenters, drawn, batch_size)
    rates, drawn_shape = brain_like_rates(scored, references, seed)
    return {"samples": rates, "brain_like": drawn_shape}, scored


def segmenter_summary(segmenters: Segmenters) -> dict:
    """Where the segmenters are kept and how accurate they are."""
    accuracy = segmenters.accuracy
    return {
        "file": None if segmenters.path is None else str(segmenters.path),
        "split": accuracy.get("split"),
        **{key: accuracy.get(key) for key in
           ("tissue_dice", "lesion_dice", "lesion_precision", "lesion_recall")},
    }

def sample_validity(
    model: Any,
    segmenters: Segmenters,
    test: CacheSplit,
    n: int = VALIDITY_SAMPLES,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    references: References | None = None,
) -> dict:
    """The invalid-lesion RATES of ``n`` prior samples of ``model`` (anything with
    ``sample(n, temperature).x_mean`` of shape (n, 1, H, W) and ``reconstruct(x)``), of the real
    slices of ``test``, of the model's reconstructions of them and of the ground truth, with the
    segmenters' accuracy. ``references`` (the cache's real brains, ``brain_references``)
    restricts the sample rate to brain-like samples. Seeded: the same call, the same numbers."""
    return scored_validity(
        model, segmenters, test, n, temperature, seed, batch_size, references
    )[0]


def overlay(ax: Any, scored: Scored, i: int, title: str) -> None:
    """Slice ``i`` with its lesions outlined in red and their invalid voxels filled in cyan."""
    ax.imshow(display(scored.images[i]), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
    lesion = scored.lesion[i]
    if lesion.any():
        ax.contour(display(lesion).astype(float), levels=[0.5], colors="red", linewidths=0.6)
    invalid = lesion & np.isin(scored.tissue[i], INVALID)
    if invalid.any():
        shown = display(invalid)
        ax.imshow(np.ma.masked_where(~shown, shown), cmap=INVALID_COLOUR, interpolation="nearest")
    ax.set_title(title, fontsize=6)
    ax.axis("off")


def percent(rates: dict) -> str:
    value = rates["invalid_fraction"]
    if value is None:
        return "no lesions found"
    if rates["ci_low"] is None:
        return f"{value:.1%}"
    return f"{value:.1%} ({rates['ci_low']:.1%}-{rates['ci_high']:.1%})"


def validity_figure(result: dict, samples: Scored, staged: Scored | None, real: Scored,
                    kind: str) -> Any:
    """The model's prior samples, a row of second-stage draws where there are any, and a row of
    real test slices, each with its lesions outlined and invalid voxels filled."""
    import matplotlib.pyplot as plt

    columns = FIGURE_REAL
    prior_rows = -(-min(FIGURE_SAMPLES, len(samples.images)) // columns)
    rows = prior_rows + (staged is not None) + 1
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes[:prior_rows].flat):
        if i < len(samples.images):
            overlay(ax, samples, i, f"prior sample {i}")
    title = f"{kind}: invalid lesion voxels, prior samples {percent(result['samples'])}"
    if staged is not None:
        for i, ax in enumerate(axes[prior_rows]):
            if i < len(staged.images):
                overlay(ax, staged, i, f"2nd-stage draw {i}")
        title += f", 2nd-stage draws {percent(result['second_stage']['samples'])}"
    # Real slices spread over the split, those with lesions first: the reference look.
    with_lesions = np.flatnonzero(real.lesion.any(axis=(1, 2)))
    pool = with_lesions if len(with_lesions) >= columns else np.arange(len(real.images))
    for ax, i in zip(axes[-1], pool[np.linspace(0, len(pool) - 1, columns).astype(int)],
                     strict=True):
        overlay(ax, real, int(i), f"real test {i}")
    fig.suptitle(
        f"{title},\nreal {percent(result['real'])}, truth {percent(result['truth'])}",
        fontsize=8,
    )
    fig.tight_layout()
    return fig


@one_at_a_time("validity")
def validity_run(
    run: str | os.PathLike,
    n: int = VALIDITY_SAMPLES,
    temperature: float = TEMPERATURE,
    seed: int = SEED,
    progress: bool = True,
    segmenter_steps: int | None = None,
) -> dict:
    """Sample validity of an MS run: writes RUN/validity.json and RUN/figures/sample_validity.png
    (+ caption) and returns the result. The cohort's segmenters are trained on first use (for
    ``segmenter_steps``; None: their default) and kept in CACHE/segmenters.
    Example: ``validity_run("runs/nvmp")``."""
    start = time.perf_counter()
    opened = open_run(run)
    folder, model, config = opened.folder, opened.model, opened.config
    cache = opened.lesion_cache("sample validity scores")
    segs_start = time.perf_counter()
    steps = SEGMENTER_STEPS if segmenter_steps is None else segmenter_steps
    segmenters = cohort_segmenters(cache, steps=steps, progress=progress)
    segs_seconds = time.perf_counter() - segs_start
    test = split_arrays(cache, "test")
    result, samples, staged, real = scored_validity(
        model, segmenters, test, n, temperature, seed, DEFAULT_BATCH_SIZE,
        brain_references(cache),
        opened.second_stage(seed),
    )
    result = {"run": str(folder), "model": config.model.kind, **result}
    result["seconds"] = {"segmenters": round(segs_seconds, 2), **result["seconds"],
                         "total": round(time.perf_counter() - start, 2)}
    fig = validity_figure(result, samples, staged, real, config.model.kind)
    shown = min(FIGURE_SAMPLES, n)
    drawn = ("" if staged is None else
             f", the second-stage prior's first {min(FIGURE_REAL, n)} draws (the row above the "
             "last; their rate counts brain-like draws only, as the prior samples' does)")
    save_figure(
        fig, folder / FIGURE,
        caption=f"Prior samples of the {config.model.kind} run (temperature {temperature:g}, "
                f"first {shown} of {n}){drawn} and real test slices (bottom row): lesions found "
                f"by the lesion segmenter (p > {LESION_THRESHOLD}) outlined in red, the lesion "
                "voxels the tissue segmenter places in background, CSF or ventricles filled in "
                "cyan; title: invalid fraction with 95% bootstrap interval.",
    )
    write_json(folder / VALIDITY_JSON, result)
    return result
