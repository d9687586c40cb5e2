"""Voxel-level lesion detection scored against known masks, as the unsupervised anomaly-detection
benchmarks on MS and WMH data score it: pixel AUPRC, Dice at a threshold chosen on the validation
split, the best Dice on the test split (optimistic: its threshold is fit on the data it scores),
and the correlation of each subject's detected lesion load with its true one; every number with
a 95% percentile bootstrap interval over test subjects (a subject's voxels drawn together).

Scores are counted in bins: per subject, how many lesion and non-lesion voxels (inside the brain)
fall in each of at most ``LEVELS`` bins, whose edges are quantiles of the scores counted. Every
metric is then exact for the scores rounded to their bins, a threshold is a bin edge, and a
bootstrap replicate is a weighted sum of subjects' counts. The threshold is chosen on the
validation split's own bins (``chosen_threshold``) and is an edge of the test split's bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pathanat.errors import InputError

LEVELS = 4096
BOOTSTRAP = 2000
CONFIDENCE = 0.95


@dataclass
class Counts:
    """Per subject and score bin, the lesion and non-lesion voxels; bin k holds the scores in
    [edges[k - 1], edges[k]) (the first and last bins are open)."""

    edges: np.ndarray  # (B - 1,) ascending
    lesion: np.ndarray  # (S, B)
    healthy: np.ndarray  # (S, B)
    subjects: np.ndarray  # (S,) ids


def score_edges(scores: np.ndarray, mask: np.ndarray, levels: int = LEVELS,
                also: float | None = None) -> np.ndarray:
    """Bin edges: the distinct quantiles of the scores inside ``mask``, at most ``levels`` bins
    (and the edge ``also``)."""
    inside = np.asarray(scores)[np.asarray(mask, dtype=bool)].ravel()
    if inside.size == 0 or not np.isfinite(inside).all():
        raise InputError("scores: expected finite values inside the brain masks")
    edges = np.quantile(inside, np.linspace(0, 1, levels + 1)[1:-1])
    return np.unique(edges if also is None else np.append(edges, also))


def counts(scores: np.ndarray, truth: np.ndarray, mask: np.ndarray, subjects: np.ndarray,
           edges: np.ndarray) -> Counts:
    """``Counts`` of slices ``scores``, ``truth`` (lesion mask) and ``mask`` (brain), each
    (N, H, W), with ``subjects`` (N,) naming each slice's subject."""
    scores, truth, mask = (np.asarray(a) for a in (scores, truth, mask))
    subjects = np.asarray(subjects)
    if not scores.shape == truth.shape == mask.shape or scores.ndim != 3:
        raise InputError(f"scores {scores.shape}, truth {truth.shape} and mask {mask.shape}: "
                         "expected equal (N, H, W) shapes")
    if subjects.shape != (len(scores),):
        raise InputError(f"subjects: expected one id per slice ({len(scores)}), "
                         f"got shape {subjects.shape}")
    ids, subject = np.unique(subjects, return_inverse=True)
    inside = mask.astype(bool)
    bins = np.searchsorted(edges, scores[inside], side="right")
    owner = np.broadcast_to(subject[:, None, None], scores.shape)[inside]
    lesion = truth.astype(bool)[inside]
    size = len(edges) + 1

    def tally(pick: np.ndarray) -> np.ndarray:
        flat = np.bincount(owner[pick] * size + bins[pick], minlength=len(ids) * size)
        return flat.reshape(len(ids), size)

    return Counts(np.asarray(edges), tally(lesion), tally(~lesion), ids)


def _from_top(counts: np.ndarray) -> np.ndarray:
    """Voxels at or above each bin (called lesion by a threshold at that bin's lower edge)."""
    return np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]


def average_precision(lesion: np.ndarray, healthy: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's definition: sum over thresholds of the recall gained
    times the precision there) of pooled bin counts (..., B); NaN where there is no lesion."""
    tp, fp = _from_top(lesion).astype(float), _from_top(healthy).astype(float)
    positives = tp[..., :1]
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / positives
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    gained = recall - np.concatenate([recall[..., 1:], np.zeros_like(recall[..., :1])], axis=-1)
    return np.sum(gained * precision, axis=-1)


def dice_curve(lesion: np.ndarray, healthy: np.ndarray) -> np.ndarray:
    """Dice of calling every voxel at or above bin k a lesion, for each k (..., B)."""
    tp, fp = _from_top(lesion).astype(float), _from_top(healthy).astype(float)
    positives = tp[..., :1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * tp / (tp + fp + positives)


def chosen_threshold(val: Counts) -> float:
    """The bin edge that maximises Dice on the validation counts: scores at or above it are
    called lesion (the middle of the best run where several edges tie)."""
    if val.lesion.sum() == 0:
        raise InputError("validation split: no lesion voxels inside the brain masks, so no "
                         "threshold can be chosen")
    curve = dice_curve(val.lesion.sum(0), val.healthy.sum(0))[1:]  # bin 0 has no lower edge
    best = np.flatnonzero(curve == np.nanmax(curve))
    return float(val.edges[best[len(best) // 2]])


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _estimate(value: float, replicates: np.ndarray) -> dict:
    low, high = _interval(replicates)
    return {"mean": float(value) if np.isfinite(value) else None, "ci_low": low, "ci_high": high}


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis (NaN where either side is constant)."""
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))


def detection_scores(test: Counts, threshold: float, seed: int = 0,
                     n_boot: int = BOOTSTRAP) -> dict:
    """AUPRC, Dice at ``threshold`` (chosen on validation data; one of ``test.edges``), best Dice
    on test (optimistic) and the per-subject lesion-load correlation on ``test``, each with a
    subject-bootstrap interval."""
    at = np.flatnonzero(test.edges == threshold)
    if len(at) != 1:
        raise InputError(f"threshold {threshold!r}: expected one of the test counts' edges")
    if test.lesion.sum() == 0:
        raise InputError("test split: no lesion voxels inside the brain masks")
    k = int(at[0]) + 1  # the first bin at or above the threshold
    n = len(test.subjects)
    times = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=n_boot)
    lesion, healthy = test.lesion.sum(0), test.healthy.sum(0)
    boot_lesion, boot_healthy = times @ test.lesion, times @ test.healthy
    detected = _from_top(test.lesion + test.healthy)[:, k]
    load = test.lesion.sum(1)
    picks = np.random.default_rng(seed + 1).integers(0, n, (n_boot, n))
    return {
        "threshold": float(threshold),
        "auprc": _estimate(average_precision(lesion, healthy),
                           average_precision(boot_lesion, boot_healthy)),
        "dice": _estimate(dice_curve(lesion, healthy)[k],
                          dice_curve(boot_lesion, boot_healthy)[:, k]),
        "best_dice": _estimate(np.nanmax(dice_curve(lesion, healthy)),
                               np.nanmax(dice_curve(boot_lesion, boot_healthy), axis=1)),
        "load_correlation": _estimate(_pearson(detected, load),
                                      _pearson(detected[picks], load[picks])),
        "prevalence": float(lesion.sum() / (lesion.sum() + healthy.sum())),
        "n_subjects": n,
        "voxels": int(lesion.sum() + healthy.sum()),
    }
