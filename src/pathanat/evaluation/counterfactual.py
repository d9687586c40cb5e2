"""`pathanat counterfactual`: pathology edits of an MS model scored against the phantom's truth.

Pseudo-healthy reconstruction and lesion detection (this module so far). Each slice's pathology
groups are replaced by a lesion-free code -- their prior mean given the anatomy groups above
them (the prior at T = 0), the groups below keeping their standardised residuals, so they follow
the new context (residual mode) -- and decoded; the positive residual (slice minus pseudo-healthy
image) inside the brain is the lesion score. Residual mode, not value mode: on the cpu budget's
supervised nvmp (z_P = z_2) it scored AUPRC 0.349 against 0.280 (docs/counterfactual.md).
The score is judged by ``evaluation.detection`` on the test split, with the threshold chosen on
the validation split, beside two baselines of the same table: the positive residual of the
model's plain reconstruction, and the intensity itself (a threshold on brain intensity chosen on
validation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch

from pathanat.data.prepare import Cache, CacheSplit
from pathanat.errors import PathanatError
from pathanat.evaluation.analyze import ANALYSIS_JSON
from pathanat.evaluation.detection import (
    chosen_threshold,
    counts,
    detection_scores,
    score_edges,
)
from pathanat.evaluation.evaluate import (
    DEFAULT_BATCH_SIZE,
    batches,
    finite_or_none,
    run_cache,
    run_folder,
    split_arrays,
    write_json,
)
from pathanat.evaluation.synthesis import resolve_pathology_groups
from pathanat.figures import display, save_figure
from pathanat.models import HierarchicalVAE
from pathanat.training.run import load_trained

COUNTERFACTUAL_JSON = "counterfactual.json"
FIGURE = "figures/lesion_detection.png"
FIGURE_SLICES = 4
MODE = "residual"  # the groups below the pathology groups follow them (see the docstring)
Score = Callable[[torch.Tensor], torch.Tensor]  # (B, 1, H, W) slices -> lesion scores


@torch.no_grad()
def pseudo_healthy(model: HierarchicalVAE, x: torch.Tensor, pathology: Collection[int]
                   ) -> torch.Tensor:
    """(B, 1, H, W) likelihood means of ``x`` with its ``pathology`` groups at their prior mean
    given the groups above them and the other groups at their posterior means (residual mode)."""
    anatomy = set(range(model.config.num_groups)) - set(pathology)
    return model.resample(x, keep=anatomy, temperature=0.0, mode=MODE).x_mean


def scorers(model: HierarchicalVAE, pathology: Collection[int]) -> dict[str, Score]:
    """The lesion scores compared, by the name the tables give them."""
    return {
        "pseudo-healthy residual": lambda x: (x - pseudo_healthy(model, x, pathology)).clamp_min(0),
        "reconstruction residual": lambda x: (x - model.reconstruct(x)).clamp_min(0),
        "intensity": lambda x: x,
    }


@torch.no_grad()
def scored(score: Score, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, H, W) float32 ``score`` of slices ``images`` (N, H, W), in batches."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))[:, None]
    return np.concatenate([score(x[p])[:, 0].float().numpy()
                           for p in batches(len(x), batch_size)])


def _arrays(data: CacheSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(data.lesion) > 0, np.asarray(data.brain) > 0,
            data.slices["subject"].to_numpy())


def lesion_detection(score: Score, val: CacheSplit, test: CacheSplit, seed: int,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[dict, np.ndarray]:
    """``detection_scores`` of ``score`` on ``test`` with its threshold chosen on ``val``, and
    the test scores (N, H, W)."""
    val_scores = scored(score, val.image, batch_size)
    truth, brain, subjects = _arrays(val)
    threshold = chosen_threshold(counts(val_scores, truth, brain, subjects,
                                        score_edges(val_scores, brain)))
    test_scores = scored(score, test.image, batch_size)
    truth, brain, subjects = _arrays(test)
    edges = score_edges(test_scores, brain, also=threshold)
    return (detection_scores(counts(test_scores, truth, brain, subjects, edges), threshold, seed),
            test_scores)


def detection_figure(test: CacheSplit, maps: dict[str, np.ndarray], thresholds: dict[str, float],
                     kind: str) -> Any:
    """The most lesioned test slice of each of the most lesioned subjects, each beside its score
    maps (lesions outlined in red, the voxels above each validation-chosen threshold in
    yellow)."""
    import matplotlib.pyplot as plt

    truth = np.asarray(test.lesion) > 0
    subjects = test.slices["subject"].to_numpy()
    order = np.argsort(-truth.sum(axis=(1, 2)), kind="stable")
    _, first = np.unique(subjects[order], return_index=True)  # each subject's most lesioned slice
    shown = order[np.sort(first)][:FIGURE_SLICES]
    names = list(maps)
    fig, axes = plt.subplots(len(shown), 1 + len(names), squeeze=False,
                             figsize=(1.6 * (1 + len(names)), 1.8 * len(shown)))
    for row, i in zip(axes, shown, strict=True):
        row[0].imshow(display(test.image[i]), cmap="gray", vmin=-2.5, vmax=3.5)
        row[0].set_title(f"slice {i}", fontsize=6)
        for ax, name in zip(row[1:], names, strict=True):
            ax.imshow(display(maps[name][i]), cmap="magma")
            called = display(maps[name][i] >= thresholds[name])
            ax.contour(called.astype(float), levels=[0.5], colors="yellow", linewidths=0.4)
            ax.set_title(name, fontsize=6)
        for ax in row:
            ax.contour(display(truth[i]).astype(float), levels=[0.5], colors="red",
                       linewidths=0.5)
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{kind}: lesion scores on test slices", fontsize=8)
    fig.tight_layout()
    return fig


def counterfactual_run(run: str | os.PathLike, pathology_groups: Collection[int] | None = None,
                       seed: int = 0) -> dict:
    """Pseudo-healthy lesion detection of an MS run: writes RUN/counterfactual.json and
    RUN/figures/lesion_detection.png (+ caption) and returns the result.
    Example: ``counterfactual_run("runs/nvmp_ms")``."""
    start = time.perf_counter()
    folder = run_folder(run)
    model, config = load_trained(folder)
    model = model.float().eval()
    cache: Cache = run_cache(folder, config)
    if not cache.has_lesion:
        raise PathanatError(
            f"{folder}: lesion detection is MS-only; its cache {cache.path} has no lesion masks "
            "(an AD cohort?)"
        )
    groups, source = resolve_pathology_groups(pathology_groups, config.model,
                                              folder / ANALYSIS_JSON)
    val, test = split_arrays(cache, "val"), split_arrays(cache, "test")
    lacking = [d.name for d in (val, test)
               if not (np.asarray(d.lesion, dtype=bool) & np.asarray(d.brain, dtype=bool)).any()]
    rows, maps, thresholds = {}, {}, {}
    if not lacking:
        for name, score in scorers(model, groups).items():
            # seeded: a VampPrior z_0 at T = 0 still picks a component at random
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                rows[name], maps[name] = lesion_detection(score, val, test, seed)
            thresholds[name] = rows[name]["threshold"]
    result = finite_or_none({
        "run": str(folder), "model": config.model.kind, "seed": seed,
        "pathology_groups": groups, "pathology_source": source,
        "pseudo_healthy": f"pathology groups at their prior mean given the groups above "
                          f"(T = 0), the others at their posterior means (mode {MODE})",
        "detection": rows,
        "not_scored": (f"no lesion voxels inside the brain masks of the {' and '.join(lacking)} "
                       f"split(s)") if lacking else None,
        "seconds": round(time.perf_counter() - start, 2),
    })
    if not lacking:
        save_figure(
            detection_figure(test, maps, thresholds, config.model.kind), folder / FIGURE,
            caption=f"Lesion scores of the {config.model.kind} run on the most lesioned test "
                    f"slice of each of the {FIGURE_SLICES} most lesioned subjects: the slice, "
                    f"then each score map (pseudo-healthy residual with pathology groups "
                    f"{', '.join(f'z{g}' for g in groups)} at their prior mean; the plain "
                    f"reconstruction's residual; the intensity); true lesions outlined in red, "
                    f"the voxels at or above each score's validation-chosen threshold in yellow.",
        )
    write_json(folder / COUNTERFACTUAL_JSON, result)
    return result
