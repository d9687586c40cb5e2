"""`pathanat analyze`: what each latent group knows about pathology (Table 4, Fig. 6c, and more).

Codes are posterior means (``model.encode``: each group's mean given the means above it), one
vector per slice and group, flattened.

Table 4 (Lasso R^2 per group). The paper fits a Lasso (alpha 10, standardised features) per latent
layer on training codes and scores R^2 against T2 lesion volume. A 2-D model sees slices, so both
units are reported:
  - subject level (the paper's analogue: lesion volume is a per-subject quantity): features are
    the mean of a subject's slice codes, the target the subject's lesion volume (the cache
    attribute ``lesion_volume_mm3``; the phantom's native grid is 1 mm, so mm^3 = voxels, the unit
    the paper's alpha was set for);
  - slice level: each slice's code against that slice's own lesion area in mm^2 (pixels of the
    cache's lesion mask times the pixel area), so alpha 10 means the same in both units.
For AD the target is ``atrophy_severity`` (a subject attribute in [0, 1]; the slice level repeats
it per slice). On that scale alpha 10 would zero every coefficient, so severity is standardised
with the train split's mean and std and fitted with ``FACTOR_ALPHA``.

Beyond the paper: the same R^2 for every numeric cohort attribute (seeds left out: they are labels
of random draws, not quantities), targets standardised and ``FACTOR_ALPHA``; and DCI
(``latents.dci``, Lasso importances, slice level) of the codes against the generating factors,
per code and per latent group.

Pathology sensitivity (Fig. 6c). For a set of example slices, each group's code is multiplied by
each factor in turn (the others kept), decoded, and compared with the unscaled decoding: the mean
|change| inside the pathology region and inside the reference region, pooled over the example
slices. MS: lesion mask vs healthy brain (brain without lesion); examples are the slices with the
largest lesion areas. AD: CSF (dseg CSF and ventricles) vs tissue (GM, WM, hippocampus). A group's
ratio is its summed pathology-region change over its summed reference-region change (all
factors); the group with the highest ratio is the post-hoc z_P.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning

from pathanat.atomic import atomic_dir
from pathanat.data.phantom import COLUMN_DOCS, CSF, GM, HIPPOCAMPUS, VENTRICLES, WM
from pathanat.data.prepare import CacheSplit
from pathanat.defaults import (
    DEFAULT_BATCH_SIZE,
    SEED,
    SENSITIVITY_EXAMPLES,
    SENSITIVITY_FACTORS,
    SPLIT,
    TRAIN_SPLIT,
)
from pathanat.errors import InputError, PathanatError, checked_int
from pathanat.evaluation.evaluate import (
    as_input,
    batches,
    split_arrays,
)
from pathanat.evaluation.latents import DCI_ALPHA, LASSO_ALPHA, dci, informativeness_table
from pathanat.figures import WINDOW, display, save_figure
from pathanat.jsonfiles import finite_or_none, write_json
from pathanat.runs import one_at_a_time, open_run

FACTOR_ALPHA = DCI_ALPHA  # Lasso alpha on standardised targets (above chance correlation)
LESION_VOLUME = "lesion_volume_mm3"
ATROPHY = "atrophy_severity"
LESION_AREA = "lesion_area_mm2"
ANALYSIS_JSON = "analysis.json"


# ---- codes and targets -------------------------------------------------------------------------


@torch.no_grad()
def encoded(model, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> list[np.ndarray]:
    """Posterior means of every group of slices ``images`` (N, H, W): one (N, C, h, w) float32
    array per group."""
    parts = [[z.float().numpy() for z in model.encode(as_input(images[p])).z]
             for p in batches(len(images), batch_size)]
    return [np.concatenate(group) for group in zip(*parts, strict=True)]


def latent_codes(
    model, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[np.ndarray]:
    """Posterior means of every group, flattened: one (N, C * h * w) float32 array per group."""
    return [g.reshape(len(g), -1) for g in encoded(model, images, batch_size)]


def subject_average(values: np.ndarray, subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subject ids (first-seen order) and the mean of each subject's rows of ``values``."""
    ids, first, inverse = np.unique(subjects, return_index=True, return_inverse=True)
    order = np.argsort(first)
    counts = np.bincount(inverse).astype(np.float64)
    # each subject's rows side by side, summed in their order (np.add.at: 1.5-3.4x slower)
    rows = np.argsort(inverse.ravel(), kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.intp)
    sums = np.add.reduceat(np.asarray(values, dtype=np.float64)[rows], starts, axis=0)
    means = sums / counts.reshape(-1, *[1] * (values.ndim - 1))
    return ids[order], means[order]


def pathology_of(columns: Sequence[str], where: str) -> str:
    """'ms' when the cohort records lesion volumes, 'ad' when it records atrophy severity."""
    if LESION_VOLUME in columns:
        return "ms"
    if ATROPHY in columns:
        return "ad"
    raise InputError(
        f"{where}: no attribute {LESION_VOLUME!r} (MS) or {ATROPHY!r} (AD) to analyse against"
    )


def factor_names(slices: pd.DataFrame) -> list[str]:
    """Numeric attribute columns of a slice table, seeds and bookkeeping columns left out."""
    skip = {"subject", "slice", "z_mm", "split", "participant", "session"}
    return [
        c for c in slices.columns
        if c not in skip and not c.endswith("_seed") and pd.api.types.is_numeric_dtype(slices[c])
    ]


def generating_factors(names: Sequence[str]) -> list[str]:
    """The factors a phantom draws plus its pathology ground truth, for DCI (which assumes
    independent factors): columns the phantom only measures (region volumes, lesion counts) are
    outcomes of the drawn ones and left out; where a slice's own lesion area is known it stands
    for the pathology instead of the subject's lesion volume. Non-phantom attributes are kept."""
    def measured(name: str) -> bool:
        doc = COLUMN_DOCS.get(name)
        if name == LESION_VOLUME:
            return LESION_AREA in names
        return doc is not None and "(measured)" in doc[0]

    return [n for n in names if not measured(n)]


def usable(train: pd.DataFrame, test: pd.DataFrame) -> list[str]:
    """Targets that vary and are finite on both splits (R^2 is undefined otherwise)."""
    keep = []
    for name in train.columns:
        a, b = train[name].to_numpy(float), test[name].to_numpy(float)
        if np.isfinite(a).all() and np.isfinite(b).all() and np.ptp(a) > 0 and np.ptp(b) > 0:
            keep.append(name)
    return keep


def standardised(train: pd.DataFrame, test: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    mean, std = train.mean(), train.std(ddof=0)
    return (train - mean) / std, (test - mean) / std


# ---- informativeness ---------------------------------------------------------------------------


def r2_tables(
    groups: Sequence[str],
    train_codes: list[np.ndarray],
    test_codes: list[np.ndarray],
    train_targets: pd.DataFrame,
    test_targets: pd.DataFrame,
    raw: Sequence[str] = (),
    test_clusters: np.ndarray | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Lasso test R^2 for every group x usable target: targets in ``raw`` keep their units and the
    paper's alpha; the others are standardised (train statistics) and use ``FACTOR_ALPHA``.
    ``test_clusters`` (one id per test row, e.g. the subject of each slice) are resampled whole by
    the R^2 intervals. Returns the table (group, target, alpha, scale, r2, r2_low, r2_high) and
    the targets left out."""
    names = usable(train_targets, test_targets)
    skipped = [c for c in train_targets.columns if c not in names]
    if not names:
        empty = pd.DataFrame(columns=["group", "target", "alpha", "scale", "r2", "r2_low",
                                      "r2_high"])
        empty.attrs["not_converged"] = 0
        return empty, skipped
    tr, te = train_targets[names].astype(float), test_targets[names].astype(float)
    scaled = [c for c in names if c not in raw]
    if scaled:
        tr[scaled], te[scaled] = standardised(tr[scaled], te[scaled])
    alpha = {c: LASSO_ALPHA if c in raw else FACTOR_ALPHA for c in names}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        table = informativeness_table(
            dict(zip(groups, train_codes, strict=True)), {c: tr[c].to_numpy() for c in names},
            dict(zip(groups, test_codes, strict=True)), {c: te[c].to_numpy() for c in names},
            alpha, test_clusters=test_clusters,
        )
    # a fit that did not converge gives an approximate R^2: say how many there were
    table.attrs["not_converged"] = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    table.insert(3, "scale", ["units" if t in raw else "standardised" for t in table["target"]])
    return table, skipped


# ---- sensitivity -------------------------------------------------------------------------------


def sensitivity_regions(data: CacheSplit, pathology: str) -> tuple[np.ndarray, np.ndarray]:
    """(pathology region, reference region) masks (N, H, W) of a split."""
    brain = np.asarray(data.brain).astype(bool)
    if pathology == "ms":
        if data.lesion is None:
            raise InputError(f"split {data.name}: MS sensitivity needs lesion masks; none cached")
        lesion = np.asarray(data.lesion).astype(bool) & brain
        return lesion, brain & ~lesion
    if data.dseg is None:
        raise InputError(f"split {data.name}: AD sensitivity needs tissue labels (dseg); none")
    dseg = np.asarray(data.dseg)
    return np.isin(dseg, (CSF, VENTRICLES)), np.isin(dseg, (GM, WM, HIPPOCAMPUS))


def example_slices(region: np.ndarray, reference: np.ndarray, n: int) -> np.ndarray:
    """Indices of up to ``n`` slices with both regions, the largest pathology region first."""
    area = region.sum(axis=(1, 2))
    ok = np.flatnonzero((area > 0) & reference.any(axis=(1, 2)))
    return ok[np.argsort(-area[ok], kind="stable")][:n]


@torch.no_grad()
def pathology_sensitivity(
    model,
    images: np.ndarray,
    region: np.ndarray,
    reference: np.ndarray,
    factors: Sequence[float] = SENSITIVITY_FACTORS,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean |change| of the decoded image in ``region`` and ``reference`` when one group's
    posterior mean is scaled by each factor. Returns a table (group, factor, change_pathology,
    change_reference, ratio) and the decoded first slice per (group, factor): (G, F, H, W)."""
    x = as_input(images)
    size = tuple(images.shape[1:])
    z = model.encode(x).z
    base = model.decode(z, size).x_mean[:, 0].double().numpy()
    rows, first = [], []
    for level in range(len(z)):
        decoded = []
        for f in factors:
            scaled = [g * f if i == level else g for i, g in enumerate(z)]
            out = model.decode(scaled, size).x_mean[:, 0].double().numpy()
            change = np.abs(out - base)
            a, b = change[region].mean(), change[reference].mean()
            rows.append({"group": f"z{level}", "factor": float(f), "change_pathology": a,
                         "change_reference": b, "ratio": a / b if b > 0 else math.nan})
            decoded.append(out[0])
        first.append(decoded)
    return pd.DataFrame(rows), np.array(first)


def group_ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Per group: pathology-region change over reference-region change, summed over factors."""
    sums = table.groupby("group", sort=False)[["change_pathology", "change_reference"]].sum()
    ratio = sums["change_pathology"] / sums["change_reference"].where(sums["change_reference"] > 0)
    return sums.assign(ratio=ratio).reset_index()


# ---- the analysis ------------------------------------------------------------------------------


def analyze(
    model,
    train: CacheSplit,
    test: CacheSplit,
    factors: Sequence[float] = SENSITIVITY_FACTORS,
    examples: int = SENSITIVITY_EXAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    pixel_mm2: float = 1.0,
) -> tuple[dict, dict[str, pd.DataFrame], dict]:
    """All analyses of ``model`` (anything with ``encode(x).z`` and ``decode(z, size).x_mean``)
    fitted on ``train`` and scored on ``test``. Returns a summary, tables by name, and what the
    figures need. ``pixel_mm2`` is the area of one pixel (the slice lesion area's unit)."""
    _check_analyze_arguments(pixel_mm2, factors, examples)
    pathology = pathology_of(list(train.slices.columns), f"split {train.name}")
    images = {s.name: np.array(s.image, dtype=np.float32) for s in (train, test)}
    clock = time.perf_counter()
    codes = {name: latent_codes(model, im, batch_size) for name, im in images.items()}
    seconds = {"encode": time.perf_counter() - clock}
    groups = [f"z{i}" for i in range(len(codes[train.name]))]

    # targets per slice and per subject (a subject's codes averaged over its slices)
    slice_targets, subject_targets, subject_codes, sample_participants = {}, {}, {}, {}
    for split in (train, test):
        (slice_targets[split.name], subject_targets[split.name], subject_codes[split.name],
         sample_participants[split.name]) = split_targets(split, codes[split.name], pathology,
                                                          pixel_mm2)

    # Table 4 and every factor's R^2, at both units
    clock = time.perf_counter()
    summary: dict = {"pathology": pathology, "train_split": train.name, "test_split": test.name,
                     "groups": groups, "code_sizes": [c.shape[1] for c in codes[test.name]]}
    units = {
        "slice": Unit(codes[train.name], codes[test.name], slice_targets[train.name],
                      slice_targets[test.name], test.participants),
        "subject": Unit(subject_codes[train.name], subject_codes[test.name],
                        subject_targets[train.name], subject_targets[test.name],
                        sample_participants[test.name]),
    }
    lasso_summary, lasso_tables = lasso_section(groups, units, pathology)
    summary.update(lasso_summary)
    tables = dict(lasso_tables)
    seconds["lasso"] = time.perf_counter() - clock

    clock = time.perf_counter()
    summary["dci"], dci_tables = dci_section(groups, codes[train.name], codes[test.name],
                                             slice_targets[train.name],
                                             slice_targets[test.name], seed)
    tables.update(dci_tables)
    seconds["dci"] = time.perf_counter() - clock

    clock = time.perf_counter()
    summary["sensitivity"], sens_tables, figure_data = sensitivity_section(
        model, test, images[test.name], pathology, factors, examples)
    tables.update(sens_tables)
    seconds["sensitivity"] = time.perf_counter() - clock
    summary["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    figure_data.update(groups=groups,
                       r2={u: tables[f"r2_factors_{u}"] for u in ("slice", "subject")})
    return summary, tables, figure_data


def _check_analyze_arguments(pixel_mm2: float, factors: Sequence[float], examples: int) -> None:
    if not (math.isfinite(pixel_mm2) and pixel_mm2 > 0):
        raise PathanatError(f"pixel_mm2: expected a positive area, got {pixel_mm2!r}")
    if not factors or any(not math.isfinite(f) for f in factors):
        raise PathanatError(f"factors: expected finite scale factors, got {list(factors)}")
    checked_int(examples, "examples")


@dataclass
class Unit:
    """One unit of analysis (slices, or subjects with their slices' codes averaged)."""

    train_codes: list[np.ndarray]
    test_codes: list[np.ndarray]
    train_targets: pd.DataFrame
    test_targets: pd.DataFrame
    test_clusters: np.ndarray | None  # what the intervals resample; None: rows independent


def split_targets(split: CacheSplit, codes: list[np.ndarray], pathology: str, pixel_mm2: float,
                  ) -> tuple[pd.DataFrame, pd.DataFrame, list[np.ndarray], np.ndarray | None]:
    """A split's targets per slice (with the slice lesion area for MS) and per subject, the
    subjects' mean codes, and each subject's participant (None without sessions)."""
    names = factor_names(split.slices)
    per_slice = split.slices[names].astype(float).reset_index(drop=True)
    if pathology == "ms" and split.lesion is not None:
        area = np.asarray(split.lesion).astype(bool).sum(axis=(1, 2)) * pixel_mm2
        per_slice.insert(0, LESION_AREA, area)
    subjects = split.slices["subject"].to_numpy()
    ids, _ = subject_average(np.zeros((len(subjects), 1)), subjects)
    first = split.slices.drop_duplicates("subject").set_index("subject").loc[ids]
    per_subject = first[names].astype(float).reset_index(drop=True)
    # a sample is a session where the cohort has sessions: its person is the bootstrap unit
    participants = first["participant"].to_numpy() if "participant" in first else None
    return per_slice, per_subject, [subject_average(c, subjects)[1] for c in codes], participants


def lasso_section(groups: Sequence[str], units: dict[str, Unit], pathology: str,
                  ) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Table 4 (the pathology target per group, at each unit) and every factor's R^2."""
    if pathology == "ms":
        targets = {"slice": LESION_AREA, "subject": LESION_VOLUME}
        raw = (LESION_AREA, LESION_VOLUME)
    else:
        targets, raw = {"slice": ATROPHY, "subject": ATROPHY}, ()
    summary: dict = {}
    tables: dict[str, pd.DataFrame] = {}
    not_converged = 0
    table4: dict = {}
    for unit, u in units.items():
        target = targets[unit]
        if target not in u.train_targets:
            table4[unit] = {"target": target, "skipped": "no such column"}
            continue
        t, skipped = r2_tables(groups, u.train_codes, u.test_codes, u.train_targets[[target]],
                               u.test_targets[[target]], raw, u.test_clusters)
        tables[f"table4_{unit}"] = t
        not_converged += t.attrs["not_converged"]
        table4[unit] = {"target": target, "r2": dict(zip(t["group"], t["r2"], strict=True)),
                        "r2_ci": {g: [lo, hi] for g, lo, hi in
                                  zip(t["group"], t["r2_low"], t["r2_high"], strict=True)},
                        "alpha": float(t["alpha"].iloc[0]) if len(t) else None,
                        "scale": t["scale"].iloc[0] if len(t) else None,
                        "skipped": skipped}
    table4["paper_analogue"] = "subject"
    table4["ci_method"] = ("95% percentile bootstrap of the test R2 of the fitted Lasso over test "
                           "participants (each one's slices and sessions drawn together); the test "
                           "set's sampling error, not the fit's variation over training sets")
    table4["samples"] = {unit: [len(u.train_targets), len(u.test_targets)]
                         for unit, u in units.items()}
    summary["table4"] = table4
    for unit, u in units.items():
        t, skipped = r2_tables(groups, u.train_codes, u.test_codes, u.train_targets,
                               u.test_targets, test_clusters=u.test_clusters)
        tables[f"r2_factors_{unit}"] = t
        summary[f"r2_factors_{unit}_skipped"] = skipped
        not_converged += t.attrs["not_converged"]
    summary["lasso_fits_not_converged"] = not_converged
    return summary, tables


def dci_section(groups: Sequence[str], train_codes: list[np.ndarray],
                test_codes: list[np.ndarray], train_targets: pd.DataFrame,
                test_targets: pd.DataFrame, seed: int) -> tuple[dict, dict[str, pd.DataFrame]]:
    """DCI at the slice level against the generating factors: its summary and tables."""
    dci_factors = [f for f in usable(train_targets, test_targets)
                   if f in generating_factors(list(train_targets.columns))]
    if len(dci_factors) < 2:
        return {"skipped": f"fewer than 2 usable factors ({dci_factors})"}, {}
    labels = np.concatenate([[g] * c.shape[1] for g, c in zip(groups, train_codes, strict=True)])
    result = dci(
        np.concatenate(train_codes, axis=1), train_targets[dci_factors].to_numpy(),
        np.concatenate(test_codes, axis=1), test_targets[dci_factors].to_numpy(),
        labels=labels.tolist(), factor_names=dci_factors, seed=seed,
    )
    g = result.groups
    tables = {
        "dci_factors": result.factor_table(),
        "dci_groups": pd.DataFrame({
            "group": result.group_names, "disentanglement": g.disentanglement_per_code,
            "weight": g.importance.sum(axis=1) / g.importance.sum(),
            **{f"importance_{f}": g.importance[:, j] for j, f in enumerate(dci_factors)},
        }),
    }
    return {
        "unit": "slice", "method": "lasso", "alpha": DCI_ALPHA, "factors": dci_factors,
        "disentanglement_groups": g.disentanglement, "completeness_groups": g.completeness,
        "disentanglement_codes": result.codes.disentanglement,
        "completeness_codes": result.codes.completeness,
        "informativeness_r2_mean": float(np.mean(result.test_r2)),
    }, tables


def sensitivity_section(model, test: CacheSplit, images: np.ndarray, pathology: str,
                        factors: Sequence[float], examples: int,
                        ) -> tuple[dict, dict[str, pd.DataFrame], dict]:
    """Pathology sensitivity on ``examples`` test slices: its summary, tables and figure data."""
    region, reference = sensitivity_regions(test, pathology)
    chosen = example_slices(region, reference, examples)
    figure_data: dict = {"factors": list(factors)}
    if len(chosen) == 0:
        return {"skipped": f"no slice of split {test.name} has both regions"}, {}, figure_data
    sens, decoded = pathology_sensitivity(
        model, images[chosen], region[chosen], reference[chosen], factors
    )
    ratios = group_ratios(sens)
    best = ratios["ratio"].idxmax() if ratios["ratio"].notna().any() else None
    summary = {
        "factors": list(map(float, factors)),
        "regions": "lesion vs healthy brain" if pathology == "ms" else "CSF vs tissue",
        "examples": [f"{test.slices['subject'].iloc[i]}:{int(test.slices['slice'].iloc[i])}"
                     for i in chosen],
        "ratio": dict(zip(ratios["group"], ratios["ratio"], strict=True)),
        "z_p_posthoc": None if best is None else ratios["group"].iloc[best],
    }
    figure_data.update(image=images[chosen[0]], region=region[chosen[0]], decoded=decoded,
                       ratio=summary["ratio"])
    return summary, {"sensitivity": sens, "sensitivity_groups": ratios}, figure_data


# ---- figures -----------------------------------------------------------------------------------


def r2_figure(r2: dict[str, pd.DataFrame], groups: Sequence[str]) -> plt.Figure:
    """Heatmaps of test R^2, groups x targets, one panel per unit (slice, subject)."""
    shown = {u: t for u, t in r2.items() if len(t)}
    fig, axes = plt.subplots(len(shown) or 1, 1, squeeze=False,
                             figsize=(0.55 * max(len(t["target"].unique()) for t in shown.values())
                                      + 2.5 if shown else 4, 1.0 + 2.2 * max(1, len(shown))))
    for ax, (unit, table) in zip(axes[:, 0], shown.items(), strict=False):
        grid = table.pivot(index="group", columns="target", values="r2").reindex(groups)
        grid = grid[list(dict.fromkeys(table["target"]))]
        im = ax.imshow(grid.clip(lower=-1).to_numpy(), cmap="viridis", vmin=-1, vmax=1,
                       aspect="auto")
        ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
        for (i, j), v in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                    color="white" if v < 0.3 else "black")
        ax.set_title(f"Lasso test R$^2$ per latent group ({unit} level)", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def sensitivity_figure(data: dict) -> plt.Figure:
    """Rows = groups, columns = the example slice decoded with that group scaled by each factor
    (first column: the posterior-mean reconstruction's input), pathology region outlined."""
    groups, factors, decoded = data["groups"], data["factors"], data["decoded"]
    rows, cols = len(groups), len(factors) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
    for r, g in enumerate(groups):
        panels = [data["image"], *decoded[r]]
        titles = ["input", *(f"x{f:g}" for f in factors)]
        for c, (ax, panel) in enumerate(zip(axes[r], panels, strict=True)):
            ax.imshow(display(panel), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
            if data["region"].any():
                ax.contour(display(data["region"]).astype(float), levels=[0.5], colors="red",
                           linewidths=0.4)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=7)
        ratio = data["ratio"].get(g, math.nan)
        axes[r, 0].set_ylabel(f"{g}\nratio {ratio:.2f}", fontsize=7)
    fig.tight_layout()
    return fig


# ---- the run folder ----------------------------------------------------------------------------


@one_at_a_time("analyze")
def analyze_run(
    run: str | os.PathLike,
    split: str = SPLIT,
    train_split: str = TRAIN_SPLIT,
    factors: Sequence[float] = SENSITIVITY_FACTORS,
    examples: int = SENSITIVITY_EXAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = SEED,
) -> dict:
    """Analyse the run folder ``run``: Lasso fitted on ``train_split``, scored on ``split``.

    Writes ``RUN/analysis.json``, the tables as CSVs in ``RUN/analysis/`` and the figures
    ``RUN/figures/latent_r2.png`` and ``RUN/figures/pathology_sensitivity.png``.
    Example: ``analyze_run("runs/nvae_ms")``.
    """
    if split == train_split:
        raise PathanatError(f"split and train_split are both {split!r}; R^2 needs held-out data")
    opened = open_run(run)
    folder, model, config, cache = opened.folder, opened.model, opened.config, opened.cache
    summary, tables, figure_data = analyze(
        model, split_arrays(cache, train_split), split_arrays(cache, split),
        factors, examples, batch_size, seed, cache.manifest["parameters"]["in_plane_mm"] ** 2,
    )
    summary = {"run": str(folder), "model": config.model.kind, "z_p_configured": config.model.z_p,
               "supervised": config.model.supervised, **summary,
               "tables": sorted(f"analysis/{name}.csv" for name in tables)}
    with atomic_dir(folder / "analysis", overwrite=True) as tmp:
        for name, table in tables.items():
            table.to_csv(tmp / f"{name}.csv", index=False)
    save_figure(r2_figure(figure_data["r2"], figure_data["groups"]),
                folder / "figures" / "latent_r2.png",
                caption=f"Test R2 of a Lasso per latent group (rows) for each cohort factor "
                        f"(columns), fitted on the {train_split} split, slice and subject level.")
    if "decoded" in figure_data:
        sens = summary["sensitivity"]
        save_figure(sensitivity_figure(figure_data), folder / "figures" /
                    "pathology_sensitivity.png",
                    caption=f"Each group's posterior mean scaled by {list(factors)} (columns), one "
                            f"group per row; ratio = mean image change in {sens['regions']}; "
                            f"highest ratio (post-hoc z_P): {sens['z_p_posthoc']}.")
    write_json(folder / ANALYSIS_JSON, summary)
    return finite_or_none(summary)
