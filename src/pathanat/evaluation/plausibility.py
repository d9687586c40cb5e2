"""Sample plausibility: is a generated slice brain-shaped?

A shape test that needs no trained network: the slice's foreground (Otsu threshold, holes filled,
largest connected component) must overlap the brain mask of some real training slice with Dice
>= ``BRAIN_LIKE_DICE``. Real slices pass it (their foreground is their brain: the standardised
background is one constant value below every tissue); white noise, grey blobs and a mean brain
shifted off the cohort's brain positions do not. The fraction of brain-like slices is a binomial
proportion for i.i.d. prior draws (Wilson interval) and a subject-clustered mean for real slices
(subject bootstrap), so both rows carry an honest 95% interval.

Brain-like says nothing about variety: a model that draws one brain over and over passes it.
``shape_diversity`` (mean pairwise 1 - Dice of the slices' foregrounds) says how much the shapes
differ; the real slices' value, over subjects and slice levels, is the reference.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, stats
from skimage.filters import threshold_otsu

from pathanat.data.prepare import Cache
from pathanat.errors import InputError
from pathanat.evaluation.reconstruction import as_slices, mean_ci

BRAIN_LIKE_DICE = 0.9
CONFIDENCE = 0.95
DIVERSITY_SLICES = 512  # pairs grow as N^2; a fixed-seed subset of this many beyond it
TEST = (f"Otsu foreground, holes filled, largest component; brain-like when its best Dice "
        f"against the training slices' brain masks is >= {BRAIN_LIKE_DICE}")


def training_brains(cache: Cache) -> np.ndarray:
    """The reference masks: every brain mask of the cache's training split, (N, H, W) bool."""
    return np.asarray(cache.split("train", mmap=True).brain).astype(bool)


def foreground(image: np.ndarray) -> np.ndarray:
    """The slice's object: pixels above Otsu's threshold, holes filled, largest component.

    A constant slice has no threshold and no foreground (an empty mask)."""
    image = np.asarray(image, dtype=np.float64)
    if not np.isfinite(image).all() or np.ptp(image) == 0:
        return np.zeros(image.shape, dtype=bool)
    mask = ndimage.binary_fill_holes(image > threshold_otsu(image))
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def best_dice(masks: np.ndarray, references: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each mask (N, H, W), its highest Dice against any reference mask (M, H, W)."""
    a = np.asarray(masks, dtype=bool).reshape(len(masks), -1)
    b = np.asarray(references, dtype=bool).reshape(len(references), -1)
    if a.shape[1] != b.shape[1]:
        raise InputError(
            f"masks of shape {masks.shape[1:]} and references of shape "
            f"{references.shape[1:]} differ"
        )
    if len(b) == 0:
        raise InputError("best_dice: expected at least one reference mask, got none")
    bf = b.astype(np.float32)
    b_size = bf.sum(1)
    out = np.empty(len(a))
    for start in range(0, len(a), chunk):
        af = a[start:start + chunk].astype(np.float32)
        overlap = af @ bf.T
        total = af.sum(1)[:, None] + b_size[None, :]
        dice = np.where(total > 0, 2 * overlap / np.maximum(total, 1), 0.0)
        out[start:start + chunk] = dice.max(1)
    return out


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (stays inside [0, 1], sane at 0 and n)."""
    if n < 1:
        raise InputError(f"wilson_interval: expected n >= 1, got {n}")
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def brain_like(images: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: whether it is brain-like, and its best Dice against the reference brain masks."""
    dice = best_dice(foregrounds(images), references)
    return dice >= BRAIN_LIKE_DICE, dice


def foregrounds(images: np.ndarray) -> np.ndarray:
    images = as_slices("images", images)
    return np.stack([foreground(im) for im in images])


def shape_diversity(masks: np.ndarray, seed: int = 0) -> float:
    """Mean over pairs of masks (N, H, W) of 1 - Dice: 0 when every shape is the same.

    Two empty masks count as equal. Beyond ``DIVERSITY_SLICES`` masks, a fixed-seed subset."""
    masks = np.asarray(masks, dtype=bool)
    if len(masks) < 2:
        raise InputError(f"shape_diversity: expected at least 2 masks, got {len(masks)}")
    if len(masks) > DIVERSITY_SLICES:
        pick = np.random.default_rng(seed).choice(len(masks), DIVERSITY_SLICES, replace=False)
        masks = masks[pick]
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    overlap = flat @ flat.T
    size = flat.sum(1)
    total = size[:, None] + size[None, :]
    dice = np.where(total > 0, 2 * overlap / np.maximum(total, 1), 1.0)
    pairs = np.triu_indices(len(masks), 1)
    return float(1.0 - dice[pairs].mean())


def plausibility(
    images: np.ndarray, references: np.ndarray, subjects: np.ndarray | None = None, seed: int = 0
) -> dict:
    """The fraction of brain-like slices with a 95% interval and the Dice distribution.

    ``subjects`` (one id per slice) marks real slices: the interval is then a subject bootstrap;
    without it the slices are independent draws and the interval is Wilson's."""
    masks = foregrounds(images)
    dice = best_dice(masks, references)
    ok = dice >= BRAIN_LIKE_DICE
    n = len(ok)
    if subjects is not None and len(np.unique(subjects)) >= 2:
        ci = mean_ci(ok.astype(float), np.asarray(subjects), CONFIDENCE, seed=seed)
        low, high, method = ci.low, ci.high, ci.method
    else:
        low, high = wilson_interval(int(ok.sum()), n)
        method = "Wilson score interval (independent draws)"
    return {
        "brain_like": {"mean": float(ok.mean()), "ci_low": float(low), "ci_high": float(high),
                       "ci_method": method},
        "n": n,
        "dice_median": float(np.median(dice)),
        "dice_threshold": BRAIN_LIKE_DICE,
        "shape_diversity": shape_diversity(masks, seed) if n >= 2 else None,
    }
