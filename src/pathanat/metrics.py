"""Reconstruction metrics per slice (PSNR, SSIM; whole slice and inside a brain mask) and their
mean with a 95% confidence interval.

Data range. PSNR and SSIM both need the dynamic range R of the images. Slices here are
standardised (zero mean, unit variance over the brain), so no dtype range applies. The default is
the *reference* slice's own range, max - min, per slice (what scikit-image would call
``data_range=ref.max() - ref.min()``); pass a number to use one fixed range for every slice instead
(e.g. the range of the whole test set), which makes values comparable across slices and models.
The masked metrics use the same R as the whole-slice ones, so the two differ only in where the
error is averaged.

Infinite PSNR. A slice reconstructed exactly has MSE 0 and PSNR +inf. Every PSNR is capped at
``PSNR_CAP`` dB (100 dB, far above any real reconstruction), so per-slice values and their means
stay finite; a capped value means "exact to numerical precision".

SSIM equals ``skimage.metrics.structural_similarity(ref, rec, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=R)`` for each slice: the same Gaussian filter (scipy's,
truncated at 3.5 sigma, mirror-reflected at the border), run once over the whole stack. The
whole-slice value averages the SSIM map without its 5-pixel border, as scikit-image does; the
masked value is the mean of the full map over the mask's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage, stats

from pathanat.errors import InputError

PSNR_CAP = 100.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scikit-image's value: radius int(3.5 * 1.5 + 0.5) = 5, an 11-pixel window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def as_slices(name: str, x: np.ndarray) -> np.ndarray:
    """A stack of 2-D slices (N, H, W) as float64; (N, 1, H, W) loses its channel axis."""
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise InputError(f"{name}: expected slices (N, H, W) or (N, 1, H, W), got {x.shape}")
    if x.shape[0] == 0:
        raise InputError(f"{name}: no slices (shape {x.shape})")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    return x


def checked_pair(
    reference: np.ndarray, test: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    ref = as_slices("reference", reference)
    rec = as_slices("reconstruction", test)
    if rec.shape != ref.shape:
        raise InputError(f"reconstruction has shape {rec.shape}, reference has {ref.shape}")
    if mask is None:
        return ref, rec, None
    m = np.asarray(mask)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.shape != ref.shape:
        raise InputError(f"mask has shape {m.shape}, expected the images' shape {ref.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise InputError("mask: expected a binary mask (bool or 0/1 values)")
        m = m.astype(bool)
    empty = np.flatnonzero(~m.any(axis=(1, 2)))
    if empty.size:
        raise InputError(f"mask is empty in slice(s) {empty[:10].tolist()}; each needs a pixel")
    return ref, rec, m


def slice_data_range(reference: np.ndarray, data_range: float | None = None) -> np.ndarray:
    """R per slice, shape (N,): ``data_range`` for all, or each reference slice's max - min."""
    ref = as_slices("reference", reference)
    if data_range is not None:
        if not np.isfinite(data_range) or data_range <= 0:
            raise InputError(f"data_range must be a positive number, got {data_range}")
        return np.full(len(ref), float(data_range))
    r = ref.max(axis=(1, 2)) - ref.min(axis=(1, 2))
    flat = np.flatnonzero(r == 0)
    if flat.size:
        raise InputError(
            f"reference slice(s) {flat[:10].tolist()} are constant, so their own range is 0; "
            "pass a fixed data_range"
        )
    return r


def psnr(
    reference: np.ndarray,
    test: np.ndarray,
    data_range: float | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """PSNR in dB per slice, 10 log10(R^2 / MSE), MSE over the slice or over its mask; capped."""
    ref, rec, m = checked_pair(reference, test, mask)
    r = slice_data_range(ref, data_range)
    mse = slice_mean((ref - rec) ** 2, m)
    with np.errstate(divide="ignore"):
        value = 10.0 * np.log10(r**2 / mse)
    return np.minimum(value, PSNR_CAP)


def ssim_map(
    reference: np.ndarray, test: np.ndarray, data_range: float | None = None
) -> np.ndarray:
    """The SSIM map (N, H, W) of each slice pair, as scikit-image's ``full=True`` map."""
    ref, rec, _ = checked_pair(reference, test, None)
    width = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1
    if min(ref.shape[1:]) < width:
        raise InputError(f"slices of {ref.shape[1:]} are smaller than the {width}-px SSIM window")
    r = slice_data_range(ref, data_range)[:, None, None]

    def blur(a: np.ndarray) -> np.ndarray:
        # sigma 0 on the slice axis: each slice is filtered on its own
        return ndimage.gaussian_filter(
            a, sigma=(0, SSIM_SIGMA, SSIM_SIGMA), truncate=SSIM_TRUNCATE, mode="reflect"
        )

    ux, uy = blur(ref), blur(rec)
    vx = blur(ref * ref) - ux * ux
    vy = blur(rec * rec) - uy * uy
    vxy = blur(ref * rec) - ux * uy
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    num = (2 * ux * uy + c1) * (2 * vxy + c2)
    den = (ux**2 + uy**2 + c1) * (vx + vy + c2)
    return num / den


def ssim(
    reference: np.ndarray,
    test: np.ndarray,
    data_range: float | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Mean SSIM per slice, shape (N,): over the map less its border, or over the mask."""
    ref, rec, m = checked_pair(reference, test, mask)
    return ssim_means(ssim_map(ref, rec, data_range), m)


def slice_mean(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean of each slice of ``a``, over its mask's pixels when a mask is given."""
    if mask is None:
        return a.mean(axis=(1, 2))
    return (a * mask).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))


def ssim_means(s: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:  # scikit-image's mean leaves out the border the window overhangs
        pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
        return slice_mean(s[:, pad:-pad, pad:-pad], None)
    return slice_mean(s, mask)


def reconstruction_table(
    reference: np.ndarray,
    test: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float | None = None,
) -> pd.DataFrame:
    """One row per slice: psnr, ssim, and with a mask also psnr_brain, ssim_brain."""
    ref, rec, m = checked_pair(reference, test, mask)
    s = ssim_map(ref, rec, data_range)  # once, for both averages
    table = {"psnr": psnr(ref, rec, data_range), "ssim": ssim_means(s, None)}
    if m is not None:
        table["psnr_brain"] = psnr(ref, rec, data_range, m)
        table["ssim_brain"] = ssim_means(s, m)
    return pd.DataFrame(table)


@dataclass(frozen=True)
class MeanCI:
    """A mean with its confidence interval; ``method`` says how the interval was made."""

    mean: float
    low: float
    high: float
    n: int  # slices
    n_subjects: int | None
    method: str


def estimate_text(estimate: dict | None, digits: int = 4) -> str:
    """A stored estimate ``{"mean", "ci_low", "ci_high"}`` as ``mean [low, high]`` (``n/a`` when
    there is none; the interval left out when it is)."""
    if not isinstance(estimate, dict) or estimate.get("mean") is None:
        return "n/a"
    low, high = estimate.get("ci_low"), estimate.get("ci_high")
    text = f"{estimate['mean']:.{digits}g}"
    return text if low is None or high is None else f"{text} [{low:.{digits}g}, {high:.{digits}g}]"


def mean_ci(
    values: np.ndarray,
    subject_ids: np.ndarray | None = None,
    confidence: float = 0.95,
    n_boot: int = 4000,
    seed: int = 0,
) -> MeanCI:
    """Mean over slices with a confidence interval.

    Without subject ids: Student's t-interval over slices (treats slices as independent).
    With subject ids (one per slice): a subject-level (cluster) percentile bootstrap -- whole
    subjects are resampled with replacement and the slice mean recomputed -- because slices of one
    subject are correlated and a t-interval over slices would be too narrow.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise InputError(f"values: expected a 1-D array, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise InputError("values contain NaN or infinite entries")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie in (0, 1), got {confidence}")
    if len(v) < 2:
        raise InputError(f"a confidence interval needs at least 2 values, got {len(v)}")
    mean = float(v.mean())
    tail = (1 - confidence) / 2
    if subject_ids is None:
        half = float(stats.t.ppf(1 - tail, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
        return MeanCI(mean, mean - half, mean + half, len(v), None, "t-interval over slices")
    ids = np.asarray(subject_ids)
    if ids.shape != v.shape:
        raise InputError(f"subject_ids has shape {ids.shape}, values have {v.shape}")
    _, subject = np.unique(ids, return_inverse=True)
    n_subjects = int(subject.max()) + 1
    if n_subjects < 2:
        raise InputError("a subject-level interval needs slices from at least 2 subjects")
    sums = np.bincount(subject, weights=v)
    counts = np.bincount(subject).astype(np.float64)
    # each bootstrap replicate: how often each subject was drawn, then a slice-weighted mean
    times = np.random.default_rng(seed).multinomial(
        n_subjects, np.full(n_subjects, 1 / n_subjects), size=n_boot
    )
    boot = (times @ sums) / (times @ counts)
    low, high = np.quantile(boot, [tail, 1 - tail])
    return MeanCI(
        mean, float(low), float(high), len(v), n_subjects, f"subject bootstrap ({n_boot} resamples)"
    )


def summary_table(
    table: pd.DataFrame, subject_ids: np.ndarray | None = None, confidence: float = 0.95
) -> pd.DataFrame:
    """One row per metric column of ``table``: mean, ci_low, ci_high, n, n_subjects, method."""
    rows = []
    for name in table.columns:
        ci = mean_ci(table[name].to_numpy(), subject_ids, confidence)
        rows.append(
            {
                "metric": name,
                "mean": ci.mean,
                "ci_low": ci.low,
                "ci_high": ci.high,
                "n": ci.n,
                "n_subjects": ci.n_subjects,
                "method": ci.method,
            }
        )
    return pd.DataFrame(rows)
