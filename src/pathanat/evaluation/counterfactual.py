"""`pathanat counterfactual`: pathology edits of an MS model scored against the phantom's truth.

Three records, each judged by ``evaluation.edits`` or ``evaluation.detection`` on the test split:

- **swap** (Fig. 4 scored): for ``pairs`` (a, b) chosen as ``synthesis.choose_pairs`` chooses
  them, the mix P(a) + A(b) -- a's pathology groups over b's anatomy groups, by value as the
  style-mix figure -- is segmented by the cohort's segmenters and scored for effectiveness,
  anatomy kept (tissue Dice, and the non-pathology factors a ridge on training z_A codes recovers
  from the mix's z_A), reversibility (P(b) + A(mix) against b's reconstruction) and minimality;
  composition repeats the null edit (encode, decode) on the first reconstruction.
- **conditional** (Fig. 3 scored): each of ``CONDITIONAL_SOURCES`` slices a keeps its anatomy
  groups and redraws its pathology groups ``CONDITIONAL_DRAWS`` times at temperature 1 (as the
  conditional figure); "fix z_P, vary z_A" is the swap itself, scored above.
- **detection**: pseudo-healthy reconstruction. Each slice's pathology groups are replaced by a
  lesion-free code -- their prior mean given the anatomy groups above them (the prior at T = 0),
  the groups below keeping their standardised residuals, so they follow the new context (residual
  mode) -- and decoded; the positive residual (slice minus pseudo-healthy image) inside the brain
  is the lesion score. Residual mode, not value mode: on the cpu budget's supervised nvmp
  (z_P = z_2) it scored AUPRC 0.349 against 0.280 (docs/counterfactual.md). The threshold is
  chosen on the validation split; beside it two baselines: the positive residual of the model's
  plain reconstruction, and the intensity itself (a threshold on brain intensity chosen on
  validation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from pathanat.data.phantom import ANATOMY_RANGES, CONTRAST_RANGES, SCANNER_RANGES, VENTRICLES
from pathanat.data.prepare import Cache, CacheSplit
from pathanat.defaults import COUNTERFACTUAL_PAIRS, DEFAULT_BATCH_SIZE, SEED
from pathanat.errors import checked_int
from pathanat.evaluation.analyze import ANALYSIS_JSON, encoded
from pathanat.evaluation.detection import (
    chosen_threshold,
    counts,
    detection_scores,
    score_edges,
)
from pathanat.evaluation.edits import (
    REPEATS,
    composition_scores,
    conditional_scores,
    factor_r2,
    swap_scores,
)
from pathanat.evaluation.evaluate import (
    as_input,
    batches,
    split_arrays,
)
from pathanat.evaluation.segmenters import STEPS, cohort_segmenters
from pathanat.evaluation.synthesis import (
    MIX_MODE,
    choose_pairs,
    images_of,
    resolve_pathology_groups,
)
from pathanat.evaluation.validity import Scored, reconstructed_slices, segmented
from pathanat.figures import WINDOW, display, save_figure
from pathanat.jsonfiles import finite_or_none, write_json
from pathanat.metrics import estimate_text
from pathanat.models import HierarchicalVAE
from pathanat.models.edit import resample
from pathanat.runs import one_at_a_time, open_run

COUNTERFACTUAL_JSON = "counterfactual.json"
FIGURE = "figures/lesion_detection.png"
FIGURE_SLICES = 4
SWAP_FIGURE = "figures/counterfactual_swap.png"
SWAP_FIGURE_PAIRS = 4
COMPOSITION_SLICES = 32
CONDITIONAL_SOURCES = 32
CONDITIONAL_DRAWS = 8
CONDITIONAL_TEMPERATURE = 1.0  # as the conditional synthesis figure
MODE = "residual"  # the groups below the pathology groups follow them (see the docstring)


@torch.no_grad()
def pseudo_healthy(model: HierarchicalVAE, x: torch.Tensor, pathology: Collection[int]
                   ) -> torch.Tensor:
    """(B, 1, H, W) likelihood means of ``x`` with its ``pathology`` groups at their prior mean
    given the groups above them and the other groups at their posterior means (residual mode)."""
    anatomy = set(range(model.config.num_groups)) - set(pathology)
    return resample(model, x, keep=anatomy, temperature=0.0, mode=MODE).x_mean


@torch.no_grad()
def pseudo_healthy_images(model: HierarchicalVAE, images: np.ndarray, pathology: Collection[int],
                          batch_size: int) -> np.ndarray:
    """(N, H, W) ``pseudo_healthy`` images of slices ``images`` (N, H, W), in batches."""
    return np.concatenate([pseudo_healthy(model, as_input(images[p]), pathology)[:, 0].numpy()
                           for p in batches(len(images), batch_size)])


def score_maps(images: np.ndarray, healthy: np.ndarray, reconstructions: np.ndarray
               ) -> dict[str, np.ndarray]:
    """The lesion scores compared, (N, H, W) each, by the name the tables give them."""
    return {"pseudo-healthy residual": np.clip(images - healthy, 0, None),
            "reconstruction residual": np.clip(images - reconstructions, 0, None),
            "intensity": images}


def _arrays(data: CacheSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.asarray(data.lesion) > 0, np.asarray(data.brain) > 0, data.participants


def lesion_detection(val_scores: np.ndarray, test_scores: np.ndarray, val: CacheSplit,
                     test: CacheSplit, seed: int) -> dict:
    """``detection_scores`` of lesion scores (N, H, W) on ``test`` with the threshold chosen on
    ``val``."""
    truth, brain, subjects = _arrays(val)
    threshold = chosen_threshold(counts(val_scores, truth, brain, subjects,
                                        score_edges(val_scores, brain)))
    truth, brain, subjects = _arrays(test)
    edges = score_edges(test_scores, brain, also=threshold)
    return detection_scores(counts(test_scores, truth, brain, subjects, edges), threshold, seed)


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
        row[0].imshow(display(test.image[i]), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
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


# ---- edits: swap, composition, conditional -----------------------------------------------------


def take(scored: Scored, index: np.ndarray) -> Scored:
    return Scored(scored.images[index], scored.lesion[index], scored.tissue[index])


@torch.no_grad()
def decoded(model: HierarchicalVAE, z: list[np.ndarray], size: tuple[int, int],
            batch_size: int) -> np.ndarray:
    """(N, H, W) likelihood means of latents ``z`` (one (N, C, h, w) array per group)."""
    return np.concatenate([
        images_of(model.decode([torch.from_numpy(g[p]) for g in z], size))
        for p in batches(len(z[0]), batch_size)])


def swapped(a: list[np.ndarray], b: list[np.ndarray], pathology: Collection[int]
            ) -> list[np.ndarray]:
    """a's ``pathology`` groups with b's others: the value-mode mix (as the style-mix figure)."""
    return [za if g in set(pathology) else zb for g, (za, zb) in enumerate(zip(a, b, strict=True))]


def flattened(z: list[np.ndarray], pathology: Collection[int]) -> np.ndarray:
    """(N, D): the groups not in ``pathology``, flattened, side by side (the codes of z_A)."""
    return np.concatenate([g.reshape(len(g), -1) for i, g in enumerate(z)
                           if i not in set(pathology)], axis=1)


@torch.no_grad()
def redrawn(model: HierarchicalVAE, images: np.ndarray, pathology: Collection[int], draws: int,
            temperature: float, batch_size: int) -> np.ndarray:
    """(S, draws, H, W): each of ``images`` (S, H, W) with its anatomy groups kept (by value) and
    its pathology groups drawn from the prior given the groups above them."""
    anatomy = set(range(model.config.num_groups)) - set(pathology)
    x = np.repeat(images, draws, axis=0)
    out = np.concatenate([
        images_of(resample(model, as_input(x[p]), keep=anatomy, temperature=temperature,
                           mode=MIX_MODE))
        for p in batches(len(x), batch_size)])
    return out.reshape(len(images), draws, *out.shape[1:])


def null_edits(model: HierarchicalVAE, first: np.ndarray, repeats: Sequence[int],
               batch_size: int) -> dict[int, np.ndarray]:
    """``first`` (N, H, W) encoded and decoded k times, for each k in ``repeats``."""
    out, current = {}, first
    for k in range(1, max(repeats) + 1):
        current = reconstructed_slices(model, current, batch_size)
        if k in repeats:
            out[k] = current
    return out


def non_pathology_factors(slices: pd.DataFrame) -> list[str]:
    """The phantom's drawn factors that z_A should hold: slice position, anatomy, contrast and
    scanner (the pathology factors and the seeds left out)."""
    contrast = dict.fromkeys(name for ranges in CONTRAST_RANGES.values() for name in ranges)
    names = ["z_mm", *ANATOMY_RANGES, *contrast, *SCANNER_RANGES]
    return [n for n in names if n in slices.columns]


@dataclass(frozen=True)
class Setting:
    """What every edit record uses: the model and its pathology groups, the cohort's segmenters,
    the seed, the batch size and the pixel area (mm^2)."""

    model: HierarchicalVAE
    pathology: list[int]
    segmenters: Any
    seed: int
    batch_size: int
    pixel_mm2: float

    def segmented(self, images: np.ndarray) -> Scored:
        return segmented(self.segmenters, images, self.batch_size)

    def encoded(self, images: np.ndarray) -> list[np.ndarray]:
        return encoded(self.model, images, self.batch_size)

    def decoded(self, z: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
        return decoded(self.model, z, size, self.batch_size)

    def codes(self, images: np.ndarray) -> np.ndarray:
        return flattened(self.encoded(images), self.pathology)


@dataclass
class Swap:
    """The arrays behind the swap record, for its figure."""

    a: np.ndarray  # (N,) slice indices
    b: np.ndarray
    mix: Scored
    back: np.ndarray
    recon_b: np.ndarray


def swap_record(k: Setting, train: CacheSplit, val: CacheSplit, test: CacheSplit,
                rebuilt: Scored, pairs: int) -> tuple[dict, Swap]:
    """``edits.swap_scores`` of ``pairs`` pairs of ``test`` (``rebuilt``: its reconstructions,
    segmented), with the non-pathology factors' R^2 from the mix's z_A beside b's own."""
    a, b = (np.array(side) for side in zip(*choose_pairs(test, pairs, k.seed), strict=True))
    image = np.asarray(test.image, dtype=np.float32)
    lesion, dseg = np.asarray(test.lesion) > 0, np.asarray(test.dseg)
    subjects = test.participants  # the bootstrap's unit
    size = image.shape[1:]
    za, zb = k.encoded(image[a]), k.encoded(image[b])
    mix = k.segmented(k.decoded(swapped(za, zb, k.pathology), size))
    zmix = k.encoded(mix.images)
    back = k.decoded(swapped(zb, zmix, k.pathology), size)
    record = swap_scores(lesion[a], lesion[b], dseg[b], np.asarray(test.brain)[b] > 0, mix, back,
                         take(rebuilt, a), take(rebuilt, b), subjects[a], k.pixel_mm2, k.seed)
    names = non_pathology_factors(test.slices)
    # every other training slice: neighbours 1 mm apart nearly repeat, and encoding costs
    record["anatomy"]["factors"] = factor_r2(
        k.codes(train.image[::2]), train.slices[names].iloc[::2],
        k.codes(val.image), val.slices[names],
        {"mix": flattened(zmix, k.pathology), "b": flattened(zb, k.pathology)},
        test.slices[names].iloc[b].reset_index(drop=True), subjects[b], k.seed)
    return record, Swap(a, b, mix, back, rebuilt.images[b])


def composition_record(k: Setting, rebuilt: Scored, sources: np.ndarray,
                       subjects: np.ndarray) -> dict:
    first = take(rebuilt, sources)
    repeated = {n: k.segmented(images)
                for n, images in null_edits(k.model, first.images, REPEATS, k.batch_size).items()}
    return composition_scores(first, repeated, subjects[sources], k.pixel_mm2, k.seed)


def conditional_record(k: Setting, test: CacheSplit, sources: np.ndarray) -> dict:
    image = np.asarray(test.image, dtype=np.float32)[sources]
    drawn = redrawn(k.model, image, k.pathology, CONDITIONAL_DRAWS, CONDITIONAL_TEMPERATURE,
                    k.batch_size)
    flat = k.segmented(drawn.reshape(-1, *drawn.shape[2:]))
    scored = Scored(drawn, flat.lesion.reshape(drawn.shape), flat.tissue.reshape(drawn.shape))
    return {"temperature": CONDITIONAL_TEMPERATURE,
            **conditional_scores(scored, np.asarray(test.lesion)[sources] > 0,
                                 np.asarray(test.dseg)[sources],
                                 test.participants[sources], k.pixel_mm2, k.seed)}


def summary_lines(result: dict) -> list[str]:
    """The swap, composition and conditional records of a ``counterfactual_run`` result, as the
    CLI and the demo print them (estimates with their 95% subject-bootstrap intervals)."""
    swap, composition, conditional = (result.get(k) for k in ("swap", "composition",
                                                               "conditional"))
    if not swap:
        return []
    effect, anatomy = swap["effectiveness"], swap["anatomy"]
    held = anatomy["factors"]["mix"]["mean_r2_held"]
    own = anatomy["factors"]["b"]["mean_r2_held"]
    repeated = composition[str(max(REPEATS))]
    return [
        f"swap P(a) + A(b), {swap['pairs']} pairs: lesion area r "
        f"{estimate_text(effect['area_correlation'], 3)} (a's own reconstruction "
        f"{estimate_text(effect['reference_a_reconstruction']['area_correlation'], 3)}), Dice "
        f"where b allows {estimate_text(effect['lesion_dice_where_allowed'], 3)}; minimality "
        f"{estimate_text(swap['minimality'], 3)} (0 = only lesions change)",
        f"  anatomy kept: WM Dice {estimate_text(anatomy['tissue_dice']['WM'], 3)} (b's "
        f"reconstruction {estimate_text(anatomy['reference_b_reconstruction']['WM'], 3)}), "
        f"factor R^2 from the mix's z_A "
        f"{estimate_text(held, 3) if held else 'n/a (no factor held)'} (b's own "
        f"{estimate_text(own, 3) if own else 'n/a'}); swapped back: PSNR "
        f"{estimate_text(swap['reversibility']['psnr'], 3)} dB",
        f"  null edit x{max(REPEATS)}: PSNR {estimate_text(repeated['psnr'], 3)} dB, lesion area "
        f"drift {estimate_text(repeated['lesion_area_drift_mm2'], 3)} mm^2; conditional "
        f"redraws: area spread {estimate_text(conditional['lesion_area_spread_mm2'], 3)} mm^2, "
        f"in valid tissue {estimate_text(conditional['lesion_in_valid_tissue'], 3)}",
    ]


def swap_figure(test: CacheSplit, swap: Swap, kind: str) -> Any:
    """The first pairs: a, b, the mix P(a) + A(b), P(b) + A(mix), and |mix - b's
    reconstruction|; outlines: true lesions red, segmented lesions yellow, ventricles cyan (true
    on b, segmented on the mix)."""
    import matplotlib.pyplot as plt

    lesion, dseg = np.asarray(test.lesion) > 0, np.asarray(test.dseg)
    shown = range(min(SWAP_FIGURE_PAIRS, len(swap.a)))
    titles = ("a", "b", "P(a) + A(b)", "P(b) + A(mix)", "|mix - rec. b|")
    fig, axes = plt.subplots(len(shown), len(titles), squeeze=False,
                             figsize=(1.6 * len(titles), 1.8 * len(shown)))

    def outline(ax: Any, mask: np.ndarray, colour: str) -> None:
        if mask.any():
            ax.contour(display(mask).astype(float), levels=[0.5], colors=colour, linewidths=0.5)

    for row, i in zip(axes, shown, strict=False):
        a, b = swap.a[i], swap.b[i]
        for ax, picture in zip(row[:4], (test.image[a], test.image[b], swap.mix.images[i],
                                        swap.back[i]), strict=True):
            ax.imshow(display(picture), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
        row[4].imshow(display(np.abs(swap.mix.images[i] - swap.recon_b[i])), cmap="magma",
                      vmin=0, vmax=1.5)
        outline(row[0], lesion[a], "red")
        outline(row[1], dseg[b] == VENTRICLES, "cyan")
        outline(row[2], lesion[a], "red")
        outline(row[2], swap.mix.lesion[i], "yellow")
        outline(row[2], swap.mix.tissue[i] == VENTRICLES, "cyan")
        outline(row[4], lesion[a] | lesion[b], "red")
        for ax, title in zip(row, titles, strict=True):
            ax.set_title(title, fontsize=6)
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{kind}: pathology swap on test pairs", fontsize=8)
    fig.tight_layout()
    return fig


@one_at_a_time("counterfactual")
def counterfactual_run(run: str | os.PathLike, pathology_groups: Collection[int] | None = None,
                       seed: int = SEED, pairs: int = COUNTERFACTUAL_PAIRS,
                       segmenter_steps: int | None = None, progress: bool = True) -> dict:
    """Swap, composition, conditional and lesion-detection records of an MS run: writes
    RUN/counterfactual.json, RUN/figures/counterfactual_swap.png and lesion_detection.png (+
    captions) and returns the result. The cohort's segmenters are trained on first use (for
    ``segmenter_steps``; None: their default) and kept in CACHE/segmenters.
    Example: ``counterfactual_run("runs/nvmp_ms")``."""
    start = time.perf_counter()
    checked_int(pairs, "pairs", minimum=2)
    opened = open_run(run)
    folder, model, config = opened.folder, opened.model, opened.config
    cache = opened.lesion_cache("counterfactual scores")
    groups, source = resolve_pathology_groups(pathology_groups, config.model,
                                              folder / ANALYSIS_JSON)
    val, test = split_arrays(cache, "val"), split_arrays(cache, "test")
    lacking = [d.name for d in (val, test)
               if not (np.asarray(d.lesion, dtype=bool) & np.asarray(d.brain, dtype=bool)).any()]
    records: dict[str, Any] = {"swap": None, "composition": None, "conditional": None,
                               "detection": {}}
    seconds: dict[str, float] = {}
    if not lacking:
        segmenters = cohort_segmenters(cache, steps=STEPS if segmenter_steps is None
                                       else segmenter_steps, progress=progress)
        setting = Setting(model, groups, segmenters, seed, DEFAULT_BATCH_SIZE,
                          float(cache.manifest["parameters"]["in_plane_mm"]) ** 2)
        records, seconds, swap, maps = _records(setting, cache, val, test, pairs)
    result = finite_or_none({
        "run": str(folder), "model": config.model.kind, "seed": seed,
        "pathology_groups": groups, "pathology_source": source,
        "pseudo_healthy": f"pathology groups at their prior mean given the groups above "
                          f"(T = 0), the others at their posterior means (mode {MODE})",
        "mix": f"a's pathology groups over b's other groups, posterior means by value "
               f"(mode {MIX_MODE})",
        **records,
        "not_scored": (f"no lesion voxels inside the brain masks of the {' and '.join(lacking)} "
                       f"split(s)") if lacking else None,
        "seconds": {**seconds, "total": round(time.perf_counter() - start, 2)},
    })
    if not lacking:
        _figures(folder, test, swap, maps, records["detection"], groups, config.model.kind)
    write_json(folder / COUNTERFACTUAL_JSON, result)
    return result


def _records(k: Setting, cache: Cache, val: CacheSplit, test: CacheSplit, pairs: int
             ) -> tuple[dict, dict, Swap, dict]:
    """Every record of ``counterfactual_run``, the seconds each took, and the figures' arrays."""
    records: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    # seeded throughout: the conditional draws, and a VampPrior z_0 at T = 0 picks a component
    with torch.random.fork_rng():
        torch.manual_seed(k.seed)
        clock = time.perf_counter()
        image = np.asarray(test.image, dtype=np.float32)
        rebuilt = k.segmented(reconstructed_slices(k.model, image, k.batch_size))
        records["swap"], swap = swap_record(k, cache.split("train"), val, test, rebuilt, pairs)
        seconds["swap"] = time.perf_counter() - clock
        _, first = np.unique(swap.a, return_index=True)
        sources = swap.a[np.sort(first)]  # the distinct slices a, in the pairs' order
        clock = time.perf_counter()
        records["composition"] = composition_record(k, rebuilt, sources[:COMPOSITION_SLICES],
                                                    test.participants)
        seconds["composition"] = time.perf_counter() - clock
        clock = time.perf_counter()
        records["conditional"] = conditional_record(k, test, sources[:CONDITIONAL_SOURCES])
        seconds["conditional"] = time.perf_counter() - clock
        clock = time.perf_counter()
        torch.manual_seed(k.seed)
        val_image = np.asarray(val.image, dtype=np.float32)
        healthy = [pseudo_healthy_images(k.model, x, k.pathology, k.batch_size)
                   for x in (val_image, image)]
        val_maps = score_maps(val_image, healthy[0],
                              reconstructed_slices(k.model, val_image, k.batch_size))
        maps = score_maps(image, healthy[1], rebuilt.images)
        records["detection"] = {name: lesion_detection(val_maps[name], maps[name], val, test,
                                                       k.seed)
                                for name in maps}
        seconds["detection"] = time.perf_counter() - clock
    return records, {name: round(v, 2) for name, v in seconds.items()}, swap, maps


def _figures(folder: Any, test: CacheSplit, swap: Swap, maps: dict, detection: dict,
             groups: list[int], kind: str) -> None:
    names = ", ".join(f"z{g}" for g in groups)
    save_figure(
        swap_figure(test, swap, kind), folder / SWAP_FIGURE,
        caption=f"Pathology swap of the {kind} run (pathology groups {names}) on the first "
                f"{min(SWAP_FIGURE_PAIRS, len(swap.a))} scored test pairs: slice a, slice b, a's "
                f"pathology groups over b's other groups, b's pathology groups swapped back onto "
                f"the mix, and the mix's absolute difference from b's reconstruction; a's true "
                f"lesions outlined in red, the lesion segmenter's lesions in yellow, ventricles "
                f"in cyan (b's true ones, the tissue segmenter's on the mix).",
    )
    save_figure(
        detection_figure(test, maps, {k: row["threshold"] for k, row in detection.items()}, kind),
        folder / FIGURE,
        caption=f"Lesion scores of the {kind} run on the most lesioned test slice of each of the "
                f"{FIGURE_SLICES} most lesioned subjects: the slice, then each score map "
                f"(pseudo-healthy residual with pathology groups {names} at their prior mean; "
                f"the plain reconstruction's residual; the intensity); true lesions outlined in "
                f"red, the voxels at or above each score's validation-chosen threshold in "
                f"yellow.",
    )
