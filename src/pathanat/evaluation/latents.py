"""What the latent groups know: per-group Lasso informativeness (the paper's Table 4) and the
DCI scores of Eastwood & Williams (ICLR 2018), per latent code and per latent group.

Informativeness (Table 4). For one latent group and one target (e.g. lesion volume), a Lasso with
the paper's alpha = 10 is fitted on the train split, with features standardised by the train
split's mean and standard deviation; the score is R^2 on the test split. The target keeps its own
units (the paper's alpha refers to lesion volume in voxels), so alpha is as strong as the target's
scale makes it: pass a per-target alpha for targets on other scales. R^2 is reported as it is, not
clipped: a negative value means the regressor predicts worse than the train mean.

DCI. An importance matrix R (codes x factors) says how much each code is used to predict each
factor. Codes and factors are standardised with train statistics, then per factor:
  - ``method="lasso"`` (default): R_ij = |coefficient| of a Lasso (alpha ``DCI_ALPHA`` on the
    standardised scale). Default because it is linear like the Table-4 probe, deterministic, fast
    with thousands of codes, and gives exact zeros to unused codes, so noise does not leak into D
    and C. Its blind spot: non-linear code-factor relations.
  - ``method="forest"``: R_ij = impurity importance of a random forest (scikit-learn), which sees
    non-linear relations but spreads small importances over unused codes and is slower.
From R: P_ij = R_ij / sum_k R_ik, D_i = 1 - H_K(P_i.) with entropy in base K = number of factors;
D = sum_i rho_i D_i with rho_i = sum_j R_ij / sum_ij R_ij. P~_ij = R_ij / sum_k R_kj,
C_j = 1 - H_M(P~_.j) in base M = number of codes; C = the mean of C_j over factors (every factor
counts alike). A code (row) or factor (column) with no importance at all is treated as uniform,
so it scores 0. Informativeness: test R^2 and test MSE of the standardised factor.
The group-level variant sums the rows of R within each latent group before scoring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import Lasso
from sklearn.metrics import mean_squared_error, r2_score
from sklearn.preprocessing import StandardScaler

from pathanat.errors import InputError

LASSO_ALPHA = 10.0  # the paper's (Table 4)
DCI_ALPHA = 0.05  # standardised scale: above the ~1/sqrt(n) chance correlation of an unused code
LASSO_MAX_ITER = 10_000
FOREST_TREES = 100
FOREST_MIN_LEAF = 5  # keeps the trees from fitting noise, which would spread importance
CONFIDENCE = 0.95
R2_BOOTSTRAPS = 2000


def as_features(name: str, x: np.ndarray) -> np.ndarray:
    """Features (N, D) as float64; further axes (a latent map (N, C, h, w)) are flattened."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] < 2:
        raise InputError(f"{name}: expected features of shape (N >= 2, ...), got {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    return x.reshape(len(x), -1)


def as_target(name: str, y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (n,):
        raise InputError(f"{name}: expected one value per sample, shape ({n},), got {y.shape}")
    if not np.isfinite(y).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    if np.ptp(y) == 0:
        raise InputError(f"{name}: is constant, so R^2 is undefined")
    return y


def scaled_features(train_features: np.ndarray, test_features: np.ndarray,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Train and test features (N, ...), flattened and standardised with train statistics, in
    float32: coordinate descent over ~20k latent codes is memory-bound, and float32 halves it
    (R^2 agrees with float64 to within 1e-4 on our codes); R^2 itself is computed in float64."""
    xtr = as_features("train_features", train_features).astype(np.float32)
    xte = as_features("test_features", test_features).astype(np.float32)
    if xte.shape[1] != xtr.shape[1]:
        raise InputError(
            f"test features have {xte.shape[1]} columns, train features {xtr.shape[1]}"
        )
    scaler = StandardScaler().fit(xtr)
    return scaler.transform(xtr), scaler.transform(xte)


def scaled_lasso_predictions(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray,
                             alpha: float) -> np.ndarray:
    """Test predictions (float64) of a Lasso on features already ``scaled_features``."""
    if alpha <= 0:
        raise InputError(f"alpha must be positive, got {alpha}")
    model = Lasso(alpha=alpha, max_iter=LASSO_MAX_ITER).fit(xtr, ytr.astype(np.float32))
    return model.predict(xte).astype(np.float64)


def lasso_predictions(
    train_features: np.ndarray,
    train_target: np.ndarray,
    test_features: np.ndarray,
    test_target: np.ndarray,
    alpha: float = LASSO_ALPHA,
) -> np.ndarray:
    """Test predictions (float64) of a Lasso fitted on train features standardised with train
    statistics; ``test_target`` is only checked (one finite value per test sample)."""
    xtr, xte = scaled_features(train_features, test_features)
    ytr = as_target("train_target", train_target, len(xtr))
    as_target("test_target", test_target, len(xte))
    return scaled_lasso_predictions(xtr, ytr, xte, alpha)


def lasso_r2(
    train_features: np.ndarray,
    train_target: np.ndarray,
    test_features: np.ndarray,
    test_target: np.ndarray,
    alpha: float = LASSO_ALPHA,
) -> float:
    """Test R^2 of a Lasso fitted on train features standardised with train statistics."""
    predicted = lasso_predictions(train_features, train_target, test_features, test_target, alpha)
    return float(r2_score(np.asarray(test_target, dtype=np.float64), predicted))


def r2_replicates(
    target: np.ndarray,
    predicted: np.ndarray,
    clusters: np.ndarray | None = None,
    n_boot: int = R2_BOOTSTRAPS,
    seed: int = 0,
) -> np.ndarray:
    """(n_boot,) test R^2 of fixed predictions over bootstrap draws of the test units (whole
    ``clusters`` -- e.g. a subject's slices -- where given), each against its draw's own mean;
    NaN for a draw whose target is constant. The same ``seed`` and clusters give the same draws
    for every target, so replicates of several targets can be combined draw by draw."""
    y = np.asarray(target, dtype=np.float64)
    f = np.asarray(predicted, dtype=np.float64)
    if y.shape != f.shape or y.ndim != 1 or len(y) < 2:
        raise InputError(f"target {y.shape} and predictions {f.shape}: expected two equal (N>=2,)")
    ids = np.arange(len(y)) if clusters is None else np.unique(clusters, return_inverse=True)[1]
    if len(ids) != len(y):
        raise InputError(f"clusters: expected one id per test unit ({len(y)}), got {len(ids)}")
    k = ids.max() + 1
    # per cluster: count, sum y, sum y^2, sum of squared errors; a draw is a cluster count vector
    stats = np.stack([np.bincount(ids, minlength=k),
                      np.bincount(ids, y, k), np.bincount(ids, y * y, k),
                      np.bincount(ids, (y - f) ** 2, k)])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, k, (n_boot, k)) + k * np.arange(n_boot)[:, None]
    counts = np.bincount(draws.ravel(), minlength=n_boot * k).reshape(n_boot, k)
    n, sy, syy, sse = (counts @ row for row in stats)
    sst = syy - sy * sy / n
    ok = sst > 1e-12 * np.maximum(syy, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, 1.0 - sse / np.where(ok, sst, 1.0), np.nan)


def r2_interval(
    target: np.ndarray,
    predicted: np.ndarray,
    clusters: np.ndarray | None = None,
    confidence: float = CONFIDENCE,
    n_boot: int = R2_BOOTSTRAPS,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the test R^2 of fixed predictions (``r2_replicates``). It
    measures the test set's sampling error, not the variation of the fit over training sets.
    Draws whose target is constant are left out."""
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie in (0, 1), got {confidence}")
    r2 = r2_replicates(target, predicted, clusters, n_boot, seed)
    r2 = r2[np.isfinite(r2)]
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(r2, tail)), float(np.percentile(r2, 100 - tail))


def informativeness_table(
    train_groups: Mapping[str, np.ndarray],
    train_targets: Mapping[str, np.ndarray],
    test_groups: Mapping[str, np.ndarray],
    test_targets: Mapping[str, np.ndarray],
    alpha: float | Mapping[str, float] = LASSO_ALPHA,
    n_jobs: int = -1,
    test_clusters: np.ndarray | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Lasso test R^2 for every latent group x every target, with its 95% bootstrap interval
    (``r2_interval``; ``test_clusters``: one id per test row, resampled whole): columns group,
    target, alpha, r2, r2_low, r2_high.

    Groups map a name (e.g. "z0") to features (N, ...); targets map a name to values (N,); a
    pandas DataFrame works as the targets. ``alpha`` is one value or one per target name.
    ``n_jobs`` fits run in parallel threads (coordinate descent releases the GIL; -1: all cores).
    """
    if set(train_groups) != set(test_groups) or not train_groups:
        raise InputError(f"train groups {list(train_groups)} and test groups {list(test_groups)}")
    if set(train_targets) != set(test_targets) or not len(train_targets):
        raise InputError(
            f"train targets {list(train_targets)} and test targets {list(test_targets)} differ"
        )
    alphas = alpha if isinstance(alpha, Mapping) else dict.fromkeys(train_targets, alpha)
    missing = [t for t in train_targets if t not in alphas]
    if missing:
        raise InputError(f"alpha: no value for target(s) {missing}")
    # each group standardised once (it is the costly part of a fit), then one fit per pair
    scaled = {g: scaled_features(train_groups[g], test_groups[g]) for g in train_groups}
    first_train, first_test = next(iter(scaled.values()))
    n_train, n_test = len(first_train), len(first_test)
    ytr = {t: as_target(f"train target {t}", train_targets[t], n_train) for t in train_targets}
    for t in test_targets:
        as_target(f"test target {t}", test_targets[t], n_test)
    pairs = [(group, target) for group in train_groups for target in train_targets]
    predictions = Parallel(n_jobs=n_jobs, prefer="threads")(
        delayed(scaled_lasso_predictions)(scaled[g][0], ytr[t], scaled[g][1], alphas[t])
        for g, t in pairs
    )
    rows = []
    for (g, t), predicted in zip(pairs, predictions, strict=True):
        y = np.asarray(test_targets[t], dtype=np.float64)
        low, high = r2_interval(y, predicted, test_clusters, seed=seed)
        rows.append({"group": g, "target": t, "alpha": alphas[t],
                     "r2": float(r2_score(y, predicted)), "r2_low": low, "r2_high": high})
    return pd.DataFrame(rows)


def normalised_entropy(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy in base ``base`` of each row of non-negative weights; an all-zero row counts as
    uniform (entropy 1)."""
    total = p.sum(axis=1, keepdims=True)
    p = np.where(total > 0, p / np.where(total > 0, total, 1), 1.0 / p.shape[1])
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0)
    return -plogp.sum(axis=1) / np.log(base)


@dataclass(frozen=True)
class DCIScores:
    """Disentanglement and completeness from one importance matrix (rows: codes or groups)."""

    importance: np.ndarray  # (codes, factors)
    disentanglement_per_code: np.ndarray  # D_i
    disentanglement: float  # sum_i rho_i D_i
    completeness_per_factor: np.ndarray  # C_j
    completeness: float  # mean of C_j


def dci_scores(importance: np.ndarray) -> DCIScores:
    """D_i, D, C_j and C of an importance matrix R (codes x factors), at least 2 x 2."""
    r = np.asarray(importance, dtype=np.float64)
    if r.ndim != 2 or min(r.shape) < 2:
        raise InputError(f"importance: expected at least 2 codes x 2 factors, got shape {r.shape}")
    if not np.isfinite(r).all() or (r < 0).any():
        raise InputError("importance must be finite and non-negative")
    if r.sum() == 0:
        raise InputError("importance is all zero: no code predicts any factor")
    d_code = 1.0 - normalised_entropy(r, base=r.shape[1])
    rho = r.sum(axis=1) / r.sum()
    c_factor = 1.0 - normalised_entropy(r.T, base=r.shape[0])
    return DCIScores(r, d_code, float(rho @ d_code), c_factor, float(c_factor.mean()))


def group_importance(importance: np.ndarray, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Sum the rows of R (codes x factors) within each group; groups in first-seen order."""
    r = np.asarray(importance, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.shape != (r.shape[0],):
        raise InputError(
            f"labels: expected one group label per code ({r.shape[0]}), got {labels.shape}"
        )
    names = list(dict.fromkeys(labels.tolist()))
    return names, np.stack([r[labels == name].sum(axis=0) for name in names])


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays scaled with the train columns' mean and std (constant columns left at 0)."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


@dataclass(frozen=True)
class DCIResult:
    """DCI per code and, when groups are given, per latent group; informativeness per factor."""

    factors: list[str]
    codes: DCIScores
    groups: DCIScores | None
    group_names: list[str] | None
    test_r2: np.ndarray  # per factor
    test_mse: np.ndarray  # per factor, on the train-standardised scale

    def factor_table(self) -> pd.DataFrame:
        """One row per factor: completeness (codes, and groups if any), test R^2 and MSE."""
        table = {"factor": self.factors, "completeness": self.codes.completeness_per_factor}
        if self.groups is not None:
            table["completeness_groups"] = self.groups.completeness_per_factor
        table.update(test_r2=self.test_r2, test_mse=self.test_mse)
        return pd.DataFrame(table)


def dci(
    train_codes: np.ndarray,
    train_factors: np.ndarray,
    test_codes: np.ndarray,
    test_factors: np.ndarray,
    method: str = "lasso",
    labels: Sequence[str] | None = None,
    factor_names: Sequence[str] | None = None,
    alpha: float = DCI_ALPHA,
    seed: int = 0,
    n_jobs: int = -1,
) -> DCIResult:
    """DCI of codes (N, M) against ground-truth factors (N, K): one regressor per factor.

    ``labels`` (one latent-group name per code) adds the group-level scores. ``n_jobs``: parallel
    Lasso fits (threads) or forest trees; -1 uses every core.
    """
    if method not in ("lasso", "forest"):
        raise InputError(f"method must be 'lasso' or 'forest', got {method!r}")
    ctr, cte, ftr, fte, names = _dci_inputs(train_codes, train_factors, test_codes,
                                            test_factors, factor_names)
    ctr, cte = standardise(ctr, cte)
    ftr, fte = standardise(ftr, fte)
    if method == "lasso":
        ctr, cte = ctr.astype(np.float32), cte.astype(np.float32)  # as in lasso_r2
        fits = Parallel(n_jobs=n_jobs, prefer="threads")(
            delayed(Lasso(alpha=alpha, max_iter=LASSO_MAX_ITER).fit)(ctr, ftr[:, j])
            for j in range(ftr.shape[1])
        )
        importance = np.abs(np.stack([m.coef_ for m in fits], axis=1)).astype(np.float64)
    else:
        fits = [
            RandomForestRegressor(n_estimators=FOREST_TREES, min_samples_leaf=FOREST_MIN_LEAF,
                                  random_state=seed, n_jobs=n_jobs).fit(ctr, ftr[:, j])
            for j in range(ftr.shape[1])
        ]
        importance = np.stack([m.feature_importances_ for m in fits], axis=1)
    predictions = np.stack([m.predict(cte).astype(np.float64) for m in fits], axis=1)
    r2 = np.array([r2_score(fte[:, j], predictions[:, j]) for j in range(ftr.shape[1])])
    mse = np.array([mean_squared_error(fte[:, j], predictions[:, j])
                    for j in range(ftr.shape[1])])
    group_scores, group_names = None, None
    if labels is not None:
        group_names, grouped = group_importance(importance, labels)
        group_scores = dci_scores(grouped)
    return DCIResult(names, dci_scores(importance), group_scores, group_names, r2, mse)


def _dci_inputs(
    train_codes: np.ndarray, train_factors: np.ndarray, test_codes: np.ndarray,
    test_factors: np.ndarray, factor_names: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``dci``'s arrays checked (as 2-D features, matching in samples and columns, no factor
    constant) and the factors' names."""
    ctr, cte = as_features("train_codes", train_codes), as_features("test_codes", test_codes)
    ftr, fte = (
        as_features("train_factors", train_factors),
        as_features("test_factors", test_factors),
    )
    if len(ftr) != len(ctr) or len(fte) != len(cte):
        raise InputError(
            f"codes and factors differ in samples: train {len(ctr)} vs {len(ftr)}, "
            f"test {len(cte)} vs {len(fte)}"
        )
    if cte.shape[1] != ctr.shape[1] or fte.shape[1] != ftr.shape[1]:
        raise InputError("train and test differ in their number of codes or factors")
    if np.ptp(ftr, axis=0).min() == 0:
        raise InputError("a factor is constant on the train split; it cannot be predicted")
    names = (
        list(factor_names) if factor_names is not None else [f"f{j}" for j in range(ftr.shape[1])]
    )
    if len(names) != ftr.shape[1]:
        raise InputError(f"factor_names has {len(names)} names for {ftr.shape[1]} factors")
    return ctr, cte, ftr, fte, names
