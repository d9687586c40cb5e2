"""Scores of pathology edits against the phantom's truth, from the edited images and their
segmentations (``counterfactual`` makes both). The quantities follow the counterfactual
literature's axioms (Monteiro et al., ICLR 2023: effectiveness, composition, reversibility; the
2024 counterfactual benchmark adds minimality), measured where the phantom knows the answer.

Swap (pairs (a, b); the mix is a's pathology groups over b's anatomy groups):
- effectiveness: the lesion segmenter's lesion area on the mix against a's true lesion area
  (Pearson r over pairs, mean absolute error in mm^2), and the Dice of its lesion map with a's mask
  *where b's anatomy allows a lesion* (a's mask inside b's GM, WM or hippocampus: the tissue that
  ``validity`` calls valid); references in the same record: the same area scores for a's own
  reconstruction (what the model and segmenter reach without an edit) and for b's reconstruction
  (no edit at all: a's areas should not be found there);
- anatomy kept: the tissue segmenter's Dice on the mix against b's true labels (ventricles, WM,
  brain = any non-background label), beside the same Dice for b's reconstruction;
- reversibility: PSNR and SSIM of b's pathology swapped back onto the mix's anatomy against b's
  reconstruction;
- minimality: the mean |mix - b's reconstruction| inside b's brain but outside both subjects'
  lesions (grown by ``MARGIN_PX``), as a fraction of the mean inside them. An exact swap changes
  only the lesions and scores 0; an edit that changes the brain evenly scores about 1.

Composition: the null edit (encode, decode) applied to a slice's first reconstruction once and
``REPEATS`` times: PSNR and SSIM against the first reconstruction, and the drift of the lesion
segmenter's area.

Conditional (one source slice, its anatomy groups fixed, its pathology groups redrawn): the spread
(standard deviation) of the drawn lesion areas per source, the fraction of drawn lesion voxels in
the source's valid tissue (its true labels), and the tissue Dice of the draws against the source's
true labels.

Every estimate is a mean (or r) with a 95% percentile bootstrap interval over subjects (of a for
pairs, of the source otherwise): a subject's items are drawn together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pathanat.data.phantom import BACKGROUND, VENTRICLES, WM
from pathanat.errors import InputError
from pathanat.evaluation.latents import r2_replicates
from pathanat.evaluation.validity import INVALID, Scored
from pathanat.metrics import psnr, ssim

BOOTSTRAP = 2000
CONFIDENCE = 0.95
MARGIN_PX = 1  # lesions grown by this many pixels: a decoded lesion's blurred rim is its own
RECOVERED_R2 = 0.5  # a factor the codes hold: validation R^2 at least this
REPEATS = (1, 10)
RIDGE_ALPHAS = np.logspace(-1, 5, 13)  # chosen per factor by efficient leave-one-out
TISSUES = {"ventricles": (VENTRICLES,), "WM": (WM,), "brain": None}  # None: any non-background


# ---- estimates ---------------------------------------------------------------------------------


def _picks(clusters: np.ndarray, seed: int, n_boot: int = BOOTSTRAP) -> list[np.ndarray]:
    """Item indices of each bootstrap replicate: whole clusters drawn with replacement."""
    ids, inverse = np.unique(clusters, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(ids))]
    draws = np.random.default_rng(seed).integers(0, len(ids), (n_boot, len(ids)))
    return [np.concatenate([members[k] for k in draw]) for draw in draws]


def _summary(value: float, replicates: np.ndarray, n: int, clusters: np.ndarray) -> dict:
    replicates = replicates[np.isfinite(replicates)]
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = (np.percentile(replicates, [tail, 100 - tail]) if replicates.size
                 else (math.nan, math.nan))
    return {"mean": float(value), "ci_low": float(low), "ci_high": float(high), "n": int(n),
            "n_subjects": len(np.unique(clusters))}


def mean_estimate(values: np.ndarray, clusters: np.ndarray, seed: int) -> dict:
    """Mean of the finite ``values`` (one per item) with its cluster-bootstrap interval; items
    that are NaN (nothing to score) are left out and not counted in n."""
    values, clusters = np.asarray(values, dtype=np.float64), np.asarray(clusters)
    keep = np.isfinite(values)
    values, clusters = values[keep], clusters[keep]
    if values.size == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0,
                "n_subjects": 0}
    boot = np.array([values[p].mean() for p in _picks(clusters, seed)])
    return _summary(values.mean(), boot, values.size, clusters)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; NaN where either side is constant."""
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else math.nan


def correlation_estimate(x: np.ndarray, y: np.ndarray, clusters: np.ndarray, seed: int) -> dict:
    """Pearson r of paired ``x`` and ``y`` with its cluster-bootstrap interval."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    boot = np.array([pearson(x[p], y[p]) for p in _picks(clusters, seed)])
    return _summary(pearson(x, y), boot, x.size, clusters)


# ---- per-item quantities -----------------------------------------------------------------------


def dices(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) Dice of each pair of boolean maps (N, H, W); NaN where both are empty."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    total = (pred.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * (pred & truth).sum(axis=(1, 2)) / total, np.nan)


def tissue_mask(labels: np.ndarray, tissue: str) -> np.ndarray:
    """Boolean map of a ``TISSUES`` entry in tissue labels (N, H, W)."""
    codes = TISSUES[tissue]
    return labels != BACKGROUND if codes is None else np.isin(labels, codes)


def tissue_dices(labels: np.ndarray, truth: np.ndarray, clusters: np.ndarray, seed: int) -> dict:
    """Per ``TISSUES`` entry: the mean Dice of segmented ``labels`` against true ``truth``."""
    return {name: mean_estimate(dices(tissue_mask(labels, name), tissue_mask(truth, name)),
                                clusters, seed)
            for name in TISSUES}


def valid_tissue(labels: np.ndarray) -> np.ndarray:
    """Where a lesion may sit: labels outside ``validity.INVALID`` (background, CSF, ventricles)."""
    return ~np.isin(labels, INVALID)


def areas(lesion: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """(N,) lesion area in mm^2 of boolean maps (N, H, W)."""
    return np.asarray(lesion, dtype=bool).sum(axis=(1, 2)) * float(pixel_mm2)


def minimality(change: np.ndarray, region: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """(N,) mean |``change``| in ``brain`` outside ``region`` (grown by ``MARGIN_PX``) over the
    mean inside it; NaN where the region or its outside is empty or nothing changed inside."""
    change = np.abs(np.asarray(change, dtype=np.float64))
    grown = ndimage.binary_dilation(np.asarray(region, dtype=bool),
                                    structure=np.ones((1, 3, 3), bool), iterations=MARGIN_PX)
    outside = np.asarray(brain, dtype=bool) & ~grown
    with np.errstate(invalid="ignore", divide="ignore"):
        inside = (change * grown).sum(axis=(1, 2)) / grown.sum(axis=(1, 2))
        rest = (change * outside).sum(axis=(1, 2)) / outside.sum(axis=(1, 2))
        return np.where((inside > 0) & np.isfinite(rest), rest / inside, np.nan)


# ---- the three records -------------------------------------------------------------------------


def _check(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if np.shape(array) != shape:
        raise InputError(f"{name}: expected shape {shape}, got {np.shape(array)}")


def area_scores(found: np.ndarray, truth: np.ndarray, clusters: np.ndarray, pixel_mm2: float,
                seed: int) -> dict:
    """Segmented lesion areas against true ones: Pearson r and mean absolute error (mm^2)."""
    found, truth = areas(found, pixel_mm2), areas(truth, pixel_mm2)
    return {"area_correlation": correlation_estimate(found, truth, clusters, seed),
            "area_mae_mm2": mean_estimate(np.abs(found - truth), clusters, seed)}


def swap_scores(
    a_lesion: np.ndarray,
    b_lesion: np.ndarray,
    b_dseg: np.ndarray,
    b_brain: np.ndarray,
    mix: Scored,
    back: np.ndarray,
    recon_a: Scored,
    recon_b: Scored,
    clusters: np.ndarray,
    pixel_mm2: float,
    seed: int = 0,
) -> dict:
    """Effectiveness, anatomy kept, reversibility and minimality of N swaps (see the module
    docstring). Truth: a's lesion mask, b's lesion mask, labels and brain mask (N, H, W); the mix
    P(a) + A(b) and the reconstructions of a and b with their segmentations; ``back`` (N, H, W)
    is P(b) + A(mix); ``clusters`` the subject of each a."""
    shape = np.shape(a_lesion)
    for name, array in {"b_lesion": b_lesion, "b_dseg": b_dseg, "b_brain": b_brain,
                        "mix": mix.images, "back": back, "recon_a": recon_a.images,
                        "recon_b": recon_b.images}.items():
        _check(name, array, shape)
    _check("clusters", clusters, shape[:1])
    a_lesion, b_lesion = np.asarray(a_lesion, bool), np.asarray(b_lesion, bool)
    b_dseg = np.asarray(b_dseg)
    allowed = a_lesion & valid_tissue(b_dseg)
    return {
        "pairs": shape[0],
        "effectiveness": {
            **area_scores(mix.lesion, a_lesion, clusters, pixel_mm2, seed),
            "lesion_dice_where_allowed": mean_estimate(dices(mix.lesion, allowed), clusters,
                                                       seed),
            "allowed_fraction": float(allowed.sum() / max(a_lesion.sum(), 1)),
            "reference_a_reconstruction": area_scores(recon_a.lesion, a_lesion, clusters,
                                                      pixel_mm2, seed),
            "no_edit_b_reconstruction": area_scores(recon_b.lesion, a_lesion, clusters,
                                                    pixel_mm2, seed),
        },
        "anatomy": {
            "tissue_dice": tissue_dices(mix.tissue, b_dseg, clusters, seed),
            "reference_b_reconstruction": tissue_dices(recon_b.tissue, b_dseg, clusters, seed),
        },
        "reversibility": {
            "psnr": mean_estimate(psnr(recon_b.images, back), clusters, seed),
            "ssim": mean_estimate(ssim(recon_b.images, back), clusters, seed),
        },
        "minimality": mean_estimate(minimality(mix.images - recon_b.images, a_lesion | b_lesion,
                                               b_brain), clusters, seed),
    }


def composition_scores(first: Scored, repeated: Mapping[int, Scored], clusters: np.ndarray,
                       pixel_mm2: float, seed: int = 0) -> dict:
    """Per number of repeats: PSNR and SSIM of the repeated null edit against the first
    reconstruction, and the signed and absolute drift of the segmented lesion area (mm^2)."""
    start = areas(first.lesion, pixel_mm2)
    result = {}
    for k, edited in repeated.items():
        _check(f"repeated[{k}]", edited.images, np.shape(first.images))
        drift = areas(edited.lesion, pixel_mm2) - start
        result[str(k)] = {
            "psnr": mean_estimate(psnr(first.images, edited.images), clusters, seed),
            "ssim": mean_estimate(ssim(first.images, edited.images), clusters, seed),
            "lesion_area_drift_mm2": mean_estimate(drift, clusters, seed),
            "lesion_area_abs_drift_mm2": mean_estimate(np.abs(drift), clusters, seed),
        }
    return {"slices": len(start), **result}


def conditional_scores(drawn: Scored, source_lesion: np.ndarray, source_dseg: np.ndarray,
                       clusters: np.ndarray, pixel_mm2: float, seed: int = 0) -> dict:
    """Scores of D redraws of the pathology groups of each of S sources: ``drawn`` holds
    (S, D, H, W) images with their segmentations; truth (S, H, W); ``clusters`` (S,)."""
    s, d = np.shape(drawn.images)[:2]
    _check("source_lesion", source_lesion, (s, *np.shape(drawn.images)[2:]))
    _check("source_dseg", source_dseg, np.shape(source_lesion))
    _check("clusters", clusters, (s,))
    lesion = np.asarray(drawn.lesion, dtype=bool)
    drawn_area = lesion.sum(axis=(2, 3)) * float(pixel_mm2)  # (S, D)
    valid = valid_tissue(np.asarray(source_dseg))[:, None]
    voxels = lesion.sum(axis=(1, 2, 3)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        in_valid = np.where(voxels > 0, (lesion & valid).sum(axis=(1, 2, 3)) / voxels, np.nan)
    truth = np.repeat(np.asarray(source_dseg)[:, None], d, axis=1).reshape(s * d, *valid.shape[2:])
    return {
        "sources": s, "draws": d,
        "lesion_area_spread_mm2": mean_estimate(drawn_area.std(axis=1), clusters, seed),
        "drawn_lesion_area_mm2": mean_estimate(drawn_area.mean(axis=1), clusters, seed),
        "source_lesion_area_mm2": mean_estimate(areas(source_lesion, pixel_mm2), clusters, seed),
        "lesion_in_valid_tissue": mean_estimate(in_valid, clusters, seed),
        "tissue_dice": tissue_dices(np.asarray(drawn.tissue).reshape(truth.shape), truth,
                                    np.repeat(clusters, d), seed),
    }


def factor_r2(train_codes: np.ndarray, train_factors: pd.DataFrame, val_codes: np.ndarray,
              val_factors: pd.DataFrame, codes: Mapping[str, np.ndarray], factors: pd.DataFrame,
              clusters: np.ndarray, seed: int = 0) -> dict:
    """How well codes ``codes[name]`` (N, D) predict ``factors`` (N rows): a ridge per factor
    (codes and factors standardised on train, alpha chosen by leave-one-out from
    ``RIDGE_ALPHAS``) fitted on ``train_codes``. The factors the codes hold are those whose R^2 on
    the validation codes reaches ``RECOVERED_R2`` (chosen there, not on the scored items). Per
    name: each factor's R^2 and the mean over the held factors, with cluster-bootstrap intervals
    (the same draws for every factor)."""
    names = [c for c in train_factors.columns if np.ptp(train_factors[c].to_numpy(float)) > 0
             and np.ptp(factors[c].to_numpy(float)) > 0]
    if not names:
        raise InputError("factor_r2: no factor varies on both the train and the scored items")
    ytr = train_factors[names].to_numpy(np.float64)
    mean, std = ytr.mean(0), ytr.std(0)
    fit = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True))
    fit.fit(np.asarray(train_codes, dtype=np.float32), (ytr - mean) / std)

    def predicted(x: np.ndarray) -> np.ndarray:
        return fit.predict(np.asarray(x, dtype=np.float32)).astype(np.float64).reshape(len(x), -1)

    def r2(y: np.ndarray, f: np.ndarray) -> np.ndarray:
        return 1 - ((y - f) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)

    yval = (val_factors[names].to_numpy(np.float64) - mean) / std
    val_r2 = r2(yval, predicted(val_codes))
    held = [j for j, value in enumerate(val_r2) if value >= RECOVERED_R2]
    y = (factors[names].to_numpy(np.float64) - mean) / std
    result: dict = {"factors": names, "val_r2": dict(zip(names, val_r2.tolist(), strict=True)),
                    "held": [names[j] for j in held], "held_threshold": RECOVERED_R2}
    for name, x in codes.items():
        f = predicted(x)
        value = r2(y, f)
        boots = np.array([r2_replicates(y[:, j], f[:, j], clusters, BOOTSTRAP, seed)
                          for j in range(len(names))])
        result[name] = {
            "mean_r2_held": (_summary(value[held].mean(), boots[held].mean(axis=0), len(y),
                                      clusters) if held else None),
            "r2": {factor: _summary(value[j], boots[j], len(y), clusters)
                   for j, factor in enumerate(names)},
        }
    return result
