"""`pathanat synthesize`: what a trained model generates (Figures 3, 4, 6a, 6b of the paper).

Figures, each ``RUN/figures/synth_<what>.png`` with a one-line caption beside it:

- ``prior``: samples from the prior (likelihood means), one row per temperature (the standard
  deviation of every group's noise is scaled by it; VampPrior kinds pick a component, then draw).
- ``layers`` (Fig. 6a): row l keeps z_0 .. z_{l-1} at a test slice's posterior means and draws
  z_l .. z_L from the prior, top-down given what is above; row 0 is a full prior sample. With a
  kept *prefix* of the hierarchy the kept groups see exactly the context they were encoded in, so
  ``mode="value"`` and ``"residual"`` coincide; we use "value" (exact). Below, the same rows with
  the redrawn groups from the second-stage prior (``models.second_stage``) given the kept ones.
- ``style-mix`` (Fig. 4): the pathology groups of slice a with the anatomy groups of slice b (and
  the reverse), sources beside.
- ``conditional`` (Fig. 3): a subject's anatomy groups fixed and its pathology groups drawn from
  the prior given them, several times; and its pathology groups fixed over other subjects'
  anatomy groups; last, its pathology groups drawn from the second-stage prior given its anatomy
  groups' residuals (the groups below z_P then follow the new z_P: residual mode).
- ``clusters`` (Fig. 6b, nvmp / nvmp+): each pseudo-input u_k, its posterior-mean reconstruction,
  and the test slices for which component k is the most responsible.

Pathology and anatomy groups. The paper calls the chosen pathological subset z_P and "the rest of
the latent space" the anatomical subsets z_A (Sec. 3; App. C's post-hoc z_P likewise leaves "the
rest as z_A"). So the anatomy groups are *all* groups not in z_P, those below it included.

Mode (``models.edit.mix`` / ``resample``). Style-mixing "swaps latent features" between
subjects and Fig. 3 "fixes z_A to that of Subject B1" and "fixes z_P^B1": the groups keep their
posterior-mean *values* ("value" mode). In "residual" mode a group would keep only its deviation
from its prior and follow the other subject's groups above it, so the lower anatomy groups would
no longer be fixed; "value" is also the same operation in all four kinds (in the vae the two
coincide), which is what a comparison across kinds needs. In ``conditional`` the pathology groups
are drawn from p(z_P | z_<P) with the subject's values above them, as in the paper.

Slices. Pairs (a, b) are drawn reproducibly from the split with ``seed``: a from the slices with
marked pathology (MS: lesion area at least the median of the slices with lesions; AD: atrophy
severity at least the median), distinct subjects first; b from another subject, the same slice
index where possible, with the least pathology. ``layers`` and ``conditional`` use the first a.
All randomness comes from ``seed``: the same seed gives the same arrays.

Which groups are pathology: ``--pathology-groups`` if given; else the run's supervised z_P; else
the post-hoc z_P of ``RUN/analysis.json`` (``pathanat analyze``). Only ``style-mix`` and
``conditional`` need them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from pathanat.data.prepare import CacheSplit
from pathanat.defaults import (
    DEFAULT_BATCH_SIZE,
    DRAWS,
    PER_CLUSTER,
    PRIOR_SAMPLES,
    SEED,
    SPLIT,
    STYLE_MIX_PAIRS,
    TEMPERATURE,
    TEMPERATURES,
)
from pathanat.errors import PathanatError, checked_int
from pathanat.evaluation.analyze import ANALYSIS_JSON, ATROPHY
from pathanat.evaluation.evaluate import (
    as_input,
    batches,
    prior_samples,
    second_stage_samples,
    split_arrays,
)
from pathanat.figures import WINDOW, display, save_figure
from pathanat.jsonfiles import read_json, write_json
from pathanat.models import HierarchicalVAE, HVAEConfig
from pathanat.models.detail import decode_draws
from pathanat.models.edit import checked_groups, mix, resample
from pathanat.models.second_stage import SecondStagePrior
from pathanat.runs import one_at_a_time, open_run

ALL = ("prior", "layers", "style-mix", "conditional", "clusters")
NEEDS_PATHOLOGY = ("style-mix", "conditional")
VAMP_ONLY = ("clusters",)
SECOND_STAGE = ("prior", "layers", "conditional")  # figures with rows of the second stage
MIX_MODE = "value"  # see the module docstring
SYNTHESIS_JSON = "synthesis.json"


def figure_path(what: str) -> str:
    """Path of a figure inside the run folder: ``figures/synth_<what>.png``."""
    return f"figures/synth_{what.replace('-', '_')}.png"


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Every torch draw inside comes from ``seed``; the caller's RNG state is left as it was."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        yield


def group_names(groups: Collection[int]) -> str:
    return ", ".join(f"z{g}" for g in sorted(groups))


# ---- which groups are pathology ----------------------------------------------------------------


def checked_pathology_groups(groups: Collection[int], last: int) -> list[int]:
    """``groups`` (the ``--pathology-groups`` flag) sorted and deduplicated: one or more group
    indices, not all of them (the others are the anatomy groups); else a PathanatError."""
    chosen = checked_groups(groups, last, "--pathology-groups")
    if not chosen or len(chosen) == last + 1:
        raise PathanatError(
            f"--pathology-groups: expected one or more group indices in 0..{last}, "
            f"leaving at least one anatomy group; got {chosen}"
        )
    return chosen


def posthoc_group(analysis: Path) -> int | None:
    """The post-hoc z_P of an analysis.json ("z3" -> 3), or None where there is none."""
    if not analysis.is_file():
        return None
    found = (read_json(analysis, "rerun `pathanat analyze`").get("sensitivity") or {}).get(
        "z_p_posthoc")
    if found is None:
        return None
    if not (isinstance(found, str) and found[:1] == "z" and found[1:].isdigit()):
        raise PathanatError(
            f"{analysis}: sensitivity.z_p_posthoc: expected a group name like 'z2', got {found!r}"
        )
    return int(found[1:])


def resolve_pathology_groups(
    flag: Collection[int] | None, model: HVAEConfig, analysis: Path
) -> tuple[list[int], str]:
    """The pathology groups and where they came from: the flag, else the supervised z_P, else
    the post-hoc z_P in ``analysis`` (RUN/analysis.json)."""
    if flag is not None:
        return checked_pathology_groups(flag, model.num_groups - 1), "flag"
    if model.supervised:
        return [model.z_p], "supervised z_P"
    found = posthoc_group(analysis)
    if found is None:
        raise PathanatError(
            f"{analysis.parent}: no pathology groups known: the run is unsupervised and "
            f"{analysis.name} has no post-hoc z_P; run `pathanat analyze {analysis.parent}` "
            f"or pass --pathology-groups"
        )
    return checked_pathology_groups([found], model.num_groups - 1), "post-hoc z_P (analysis.json)"


# ---- which slices ------------------------------------------------------------------------------


def pathology_scores(data: CacheSplit) -> np.ndarray:
    """Per slice: lesion pixels (MS), the subject's atrophy severity (AD), else zeros."""
    if data.lesion is not None:
        return np.asarray(data.lesion).astype(bool).sum(axis=(1, 2)).astype(np.float64)
    if ATROPHY in data.slices.columns:
        return data.slices[ATROPHY].to_numpy(np.float64)
    return np.zeros(len(data))


def donors(data: CacheSplit, source: int, n: int, rng: np.random.Generator) -> list[int]:
    """Up to ``n`` slices of other subjects (one per subject) for slice ``source``: the same slice
    index first, then the least pathology; ties broken at random."""
    subjects = data.slices["subject"].to_numpy()
    index = data.slices["slice"].to_numpy()
    others = np.flatnonzero(subjects != subjects[source])
    if len(others) == 0:
        raise PathanatError(
            f"split {data.name}: all slices are of subject {subjects[source]}; pairs need two "
            f"subjects"
        )
    score = pathology_scores(data)
    order = others[np.lexsort((rng.random(len(others)), score[others],
                               np.abs(index[others] - index[source])))]
    chosen: list[int] = []
    for i in order:
        if len(chosen) == n:
            break
        if subjects[i] not in {subjects[j] for j in chosen}:
            chosen.append(int(i))
    return chosen


def choose_pairs(data: CacheSplit, n: int, seed: int) -> list[tuple[int, int]]:
    """Up to ``n`` (a, b) slice indices: a with marked pathology, b of another subject with the
    least (see the module docstring); where fewer than ``n`` slices qualify as a, each a gets
    further donors (of other subjects). The same ``seed`` gives the same pairs."""
    rng = np.random.default_rng(seed)
    score = pathology_scores(data)
    positive = score > 0
    pool = np.arange(len(score))
    if positive.any():
        pool = np.flatnonzero(score >= np.median(score[positive]))
    subjects = data.slices["subject"].to_numpy()
    order = rng.permutation(pool)
    # one slice per subject first (the earliest in the shuffled order), then the rest
    _, first = np.unique(subjects[order], return_index=True)
    order = np.concatenate([order[np.sort(first)], np.delete(order, first)])
    per = -(-n // len(order))  # donors per slice a where the pool holds fewer than n slices
    chosen = [[(int(a), b) for b in donors(data, a, per, rng)] for a in order[:n]]
    # every a's first donor, then every a's second, ...
    return [pair for rank in itertools.zip_longest(*chosen) for pair in rank if pair][:n]


# ---- arrays ------------------------------------------------------------------------------------


def images_of(generated) -> np.ndarray:
    """(N, H, W) float32 likelihood means."""
    return generated.x_mean[:, 0].float().numpy()


@dataclass
class Layers:
    """Fig. 6a for one slice: ``images[l]`` are ``draws`` images that keep z_0 .. z_{l-1} and
    redraw the rest; ``z[l][g]`` the latents of group g used for them (D, C, h, w)."""

    source: np.ndarray
    images: np.ndarray  # (G, D, H, W)
    z: list[list[np.ndarray]]


def layer_rows(
    model: HierarchicalVAE, image: np.ndarray, draws: int, temperature: float, seed: int
) -> Layers:
    """Rows of Fig. 6a for ``image`` (H, W); value mode (equal to residual for a kept prefix)."""
    x = as_input(np.repeat(image[None], draws, axis=0))
    rows, latents = [], []
    with seeded(seed):
        for level in range(model.config.num_groups):
            out = resample(model, x, keep=range(level), temperature=temperature, mode=MIX_MODE)
            rows.append(images_of(out))
            latents.append([z.numpy() for z in out.z])
    return Layers(np.asarray(image), np.stack(rows), latents)


def second_stage_given(
    model: HierarchicalVAE, prior: SecondStagePrior, image: np.ndarray, kept: Collection[int],
    draws: int, temperature: float,
) -> np.ndarray:
    """(draws, H, W): ``image``'s (H, W) posterior-mean residuals of the groups ``kept``, the
    others drawn from the second-stage prior given them, decoded top-down (residual mode)."""
    enc = model.encode(as_input(image[None]))
    known = [r[0] if g in kept else None for g, r in enumerate(enc.residuals)]
    return images_of(decode_draws(model, prior, prior.draw_given(known, draws, temperature),
                                  enc.input_size, with_detail=known[-1] is None))


def style_mix(
    model: HierarchicalVAE, a: np.ndarray, b: np.ndarray, pathology: Collection[int]
) -> tuple[np.ndarray, np.ndarray]:
    """For slices a and b (N, H, W): (a's pathology groups + b's anatomy groups, b's pathology
    groups + a's anatomy groups), each (N, H, W); posterior means by value."""
    xa, xb = as_input(a), as_input(b)
    with torch.no_grad():
        ab = images_of(mix(model, xa, xb, from_a=pathology, mode=MIX_MODE))
        ba = images_of(mix(model, xb, xa, from_a=pathology, mode=MIX_MODE))
    return ab, ba


@dataclass
class Conditional:
    """Fig. 3 for one slice: ``drawn`` (D, H, W) keep its anatomy groups and draw its pathology
    groups, with ``drawn_z[g]`` (D, C, h, w) the latents used; ``moved`` (M, H, W) put its
    pathology groups over the anatomy groups of M other slices."""

    drawn: np.ndarray
    drawn_z: list[np.ndarray]
    moved: np.ndarray


def conditional(
    model: HierarchicalVAE,
    image: np.ndarray,
    others: np.ndarray,
    pathology: Collection[int],
    draws: int,
    temperature: float,
    seed: int,
) -> Conditional:
    """Fig. 3 for ``image`` (H, W) and ``others`` (M, H, W): the pathology groups are drawn from
    p(z_P | z_<P) given the subject's values above them; everything kept is kept by value."""
    anatomy = set(range(model.config.num_groups)) - set(pathology)
    x = as_input(image[None])
    with seeded(seed):
        drawn = resample(model, x.repeat(draws, 1, 1, 1), keep=anatomy, temperature=temperature,
                         mode=MIX_MODE)
        moved = mix(model, x.repeat(len(others), 1, 1, 1), as_input(others), from_a=pathology,
                    mode=MIX_MODE)
    return Conditional(images_of(drawn), [z.numpy() for z in drawn.z], images_of(moved))


def require_vamp(model: HierarchicalVAE) -> None:
    if not model.config.vamp:
        raise PathanatError(
            f"clusters: model kind {model.config.kind!r} has no VampPrior (no pseudo-inputs); "
            f"clusters need nvmp or nvmp+"
        )


def pseudo_reconstructions(model: HierarchicalVAE) -> tuple[np.ndarray, np.ndarray]:
    """(pseudo-inputs, their posterior-mean reconstructions), each (K, H, W)."""
    require_vamp(model)
    with torch.no_grad():
        u = model.pseudo_inputs.detach().float()
        return u[:, 0].numpy().copy(), model.reconstruct(u)[:, 0].numpy()


def component_log_densities(
    model: HierarchicalVAE, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE
) -> np.ndarray:
    """(N, K): log q(m | u_k), the density of each slice's z_0 posterior mean m under each
    VampPrior component (the encoder's Gaussian for pseudo-input u_k), summed over z_0."""
    require_vamp(model)
    out = []
    with torch.no_grad():
        component = model.pseudo_components()[0]
        mu, log_sigma = component.mu[None], component.log_sigma[None]  # (1, K, C, h, w)
        for part in batches(len(images), batch_size):
            m = model.encode(as_input(images[part])).z[0][:, None]  # (B, 1, C, h, w)
            per_element = -0.5 * (((m - mu) / log_sigma.exp()) ** 2 + math.log(2 * math.pi))
            out.append((per_element - log_sigma).sum(dim=(2, 3, 4)).double().numpy())
    return np.concatenate(out)


def responsibilities(log_density: np.ndarray) -> np.ndarray:
    """(N, K) posterior component probabilities under the uniform mixture weights 1/K."""
    shifted = log_density - log_density.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=1, keepdims=True)


# ---- figures -----------------------------------------------------------------------------------


def image_grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    titles: Sequence[Sequence[str]] | None = None,
    row_labels: Sequence[str] | None = None,
    outlines: Sequence[Sequence[np.ndarray | None]] | None = None,
) -> plt.Figure:
    """Slices (x, y) in display order, one list per row (None = empty panel); ``outlines`` are
    masks drawn in red over the panel at the same place."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.25 * n_cols + 0.4, 1.4 * n_rows),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            panel = row[c] if c < len(row) else None
            if panel is None:
                ax.axis("off")
                continue
            ax.imshow(display(panel), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
            mask = outlines[r][c] if outlines is not None and c < len(outlines[r]) else None
            if mask is not None and np.any(mask):
                ax.contour(display(mask).astype(float), levels=[0.5], colors="red",
                           linewidths=0.5)
            if titles is not None and c < len(titles[r]) and titles[r][c]:
                ax.set_title(titles[r][c], fontsize=6)
        if row_labels is not None:
            axes[r, 0].set_ylabel(row_labels[r], fontsize=7)
            axes[r, 0].axis("on")
            for spine in axes[r, 0].spines.values():
                spine.set_visible(row[0] is not None)
    fig.tight_layout()
    return fig


# ---- one figure each: (figure, caption, the settings that made it) ------------------------------


def slice_name(data: CacheSplit, i: int) -> str:
    return f"{data.slices['subject'].iloc[i]}:{int(data.slices['slice'].iloc[i])}"


@dataclass
class Request:
    """What the figures are drawn from: a model, a split, the chosen slices and the settings."""

    model: HierarchicalVAE
    data: CacheSplit
    pairs: list[tuple[int, int]]
    pathology: list[int] | None
    seed: int
    temperatures: tuple[float, ...]
    temperature: float
    samples: int
    draws: int
    per_cluster: int
    second_stage: SecondStagePrior | None = None

    def __post_init__(self) -> None:
        self.images = np.asarray(self.data.image, dtype=np.float32)
        self.lesion = None if self.data.lesion is None else np.asarray(self.data.lesion) > 0
        self.outlined = "" if self.lesion is None else ", lesions outlined"
        self.last = self.model.config.num_groups - 1  # the last group's index

    def outline(self, i: int) -> np.ndarray | None:
        return None if self.lesion is None else self.lesion[i]

    def name(self, i: int) -> str:
        return slice_name(self.data, i)

    def anatomy(self) -> list[int]:
        return [g for g in range(self.last + 1) if g not in self.pathology]


Drawn = tuple[plt.Figure, str, dict]


def prior_figure(r: Request) -> Drawn:
    with seeded(r.seed):  # one batch per temperature
        rows = [prior_samples(r.model, r.samples, None, r.samples, t) for t in r.temperatures]
    labels = [f"T={t:g}" for t in r.temperatures]
    caption = (f"prior samples (likelihood means), one row per temperature "
               f"{', '.join(f'{t:g}' for t in r.temperatures)}; all groups z0..z{r.last} drawn "
               f"top-down from the prior (no pathology groups or mode involved); seed {r.seed}.")
    if r.second_stage is not None:
        with seeded(r.seed):
            rows.append(second_stage_samples(r.model, r.second_stage, r.samples,
                                             r.model.config.image_size, r.samples))
        labels.append("2nd stage")
        caption += (" Last row: the second-stage prior, a Gaussian mixture fitted to the "
                    "training posteriors' residuals of every group (its spread calibrated on "
                    "the validation slices'), decoded top-down"
                    + (", the finest group's detail off its span drawn by a diffusion model "
                       "(models.detail)." if r.second_stage.detail is not None else "."))
    fig = image_grid(rows, row_labels=labels)
    return fig, caption, {"temperatures": list(map(float, r.temperatures)), "samples": r.samples}


def layers_figure(r: Request) -> Drawn:
    a = r.pairs[0][0]
    out = layer_rows(r.model, r.images[a], r.draws, r.temperature, r.seed)
    rows = [[out.source, *row] for row in out.images]
    labels = ["all redrawn", *(f"keep z0..z{lvl - 1}" if lvl > 1 else "keep z0"
                               for lvl in range(1, r.last + 1))]
    caption = (f"per-layer variation (Fig. 6a) of {r.data.name} slice {r.name(a)} "
               f"(left{r.outlined}): row l keeps z0..z(l-1) at its posterior means and draws "
               f"z(l)..z{r.last} from the prior at T={r.temperature:g}, {r.draws} draws per row "
               f"(mode value; for a kept prefix value and residual coincide); seed {r.seed}.")
    if r.second_stage is not None:
        with seeded(r.seed):
            rows += [[out.source, *second_stage_given(r.model, r.second_stage, r.images[a],
                                                      range(level), r.draws, r.temperature)]
                     for level in range(r.last + 1)]
        labels += [f"2nd stage: {label}" for label in labels]
        caption += (" Lower rows: the same, the redrawn groups drawn from the second-stage "
                    "prior given the kept ones.")
    titles = [["source", *(f"draw {d + 1}" for d in range(r.draws))], *([[]] * (len(rows) - 1))]
    fig = image_grid(rows, titles, labels, [[r.outline(a)] for _ in rows])
    return fig, caption, {"slice": r.name(a), "temperature": r.temperature, "draws": r.draws,
                          "mode": MIX_MODE}


def style_mix_figure(r: Request) -> Drawn:
    ia, ib = [p[0] for p in r.pairs], [p[1] for p in r.pairs]
    ab, ba = style_mix(r.model, r.images[ia], r.images[ib], r.pathology)
    rows = [[r.images[i], r.images[j], m, n] for i, j, m, n in zip(ia, ib, ab, ba, strict=True)]
    titles = [[f"a {r.name(i)}", f"b {r.name(j)}", "P(a) + A(b)", "P(b) + A(a)"]
              for i, j in r.pairs]
    fig = image_grid(rows, titles, outlines=[[r.outline(i), r.outline(j)] for i, j in r.pairs])
    caption = (f"style-mixing (Fig. 4): per row {r.data.name} slices a (marked pathology"
               f"{r.outlined}) and b (another subject, least pathology), then a's pathology "
               f"groups {group_names(r.pathology)} with b's anatomy groups "
               f"{group_names(r.anatomy())}, and the reverse; posterior means swapped by value "
               f"(mode value); seed {r.seed}.")
    return fig, caption, {"pairs": [[r.name(i), r.name(j)] for i, j in r.pairs],
                          "pathology_groups": r.pathology, "mode": MIX_MODE}


def conditional_figure(r: Request) -> Drawn:
    a = r.pairs[0][0]
    others = donors(r.data, a, r.draws, np.random.default_rng(r.seed))
    out = conditional(r.model, r.images[a], r.images[others], r.pathology, r.draws,
                      r.temperature, r.seed)
    rows = [[r.images[a], *out.drawn], [None, *r.images[others]], [r.images[a], *out.moved]]
    titles = [[r.name(a), *["P redrawn"] * r.draws], ["", *map(r.name, others)],
              ["", *["P(subject) + A"] * len(others)]]
    labels = ["fix A, draw P", "other subjects", "fix P, their A"]
    outlines = [[r.outline(a)], [None, *map(r.outline, others)], [r.outline(a)]]
    caption = (f"conditional synthesis (Fig. 3) for {r.data.name} slice {r.name(a)}: top, its "
               f"anatomy groups {group_names(r.anatomy())} fixed and the pathology groups "
               f"{group_names(r.pathology)} drawn from the prior given them at "
               f"T={r.temperature:g}; then its pathology groups fixed over the anatomy groups "
               f"of the other subjects' slices in the row above (mode value); seed {r.seed}.")
    if r.second_stage is not None:
        with seeded(r.seed):
            drawn = second_stage_given(r.model, r.second_stage, r.images[a], r.anatomy(),
                                       r.draws, r.temperature)
        rows.append([r.images[a], *drawn])
        titles.append(["", *["P redrawn"] * r.draws])
        labels.append("2nd stage: fix A, draw P")
        outlines.append([r.outline(a)])
        caption += (" Last row: the pathology groups drawn from the second-stage prior given "
                    "the anatomy groups' residuals (residual mode).")
    fig = image_grid(rows, titles, labels, outlines)
    return fig, caption, {"slice": r.name(a), "others": list(map(r.name, others)),
                          "pathology_groups": r.pathology, "temperature": r.temperature,
                          "draws": r.draws, "mode": MIX_MODE}


def clusters_figure(r: Request) -> Drawn:
    pseudo, decoded = pseudo_reconstructions(r.model)
    resp = responsibilities(component_log_densities(r.model, r.images))
    assigned = resp.argmax(axis=1)
    counts = np.bincount(assigned, minlength=len(pseudo))
    rows, titles, labels = [], [], []
    for k in range(len(pseudo)):
        members = np.flatnonzero(assigned == k)
        members = members[np.argsort(-resp[members, k], kind="stable")][: r.per_cluster]
        rows.append([pseudo[k], decoded[k], *r.images[members]])
        titles.append([*(["u_k", "decoded"] if k == 0 else ["", ""]), *map(r.name, members)])
        labels.append(f"k={k} (n={counts[k]})")
    fig = image_grid(rows, titles, labels)
    caption = (f"VampPrior clusters (Fig. 6b): per component k the pseudo-input u_k, its "
               f"posterior-mean reconstruction, and up to {r.per_cluster} of the "
               f"{len(r.images)} {r.data.name} slices it is most responsible for (responsibility "
               f"from the z0 posterior mean under each component's Gaussian), n = slices "
               f"assigned; no pathology groups or mode involved.")
    return fig, caption, {"cluster_sizes": counts.tolist()}


FIGURES = {"prior": prior_figure, "layers": layers_figure, "style-mix": style_mix_figure,
           "conditional": conditional_figure, "clusters": clusters_figure}


# ---- the run folder ----------------------------------------------------------------------------


def checked_what(what: Sequence[str] | None, model: HierarchicalVAE) -> list[str]:
    """The figures to draw: all the kind supports by default; an unknown name or clusters for a
    kind without a VampPrior is an error."""
    if what is None:
        return [w for w in ALL if model.config.vamp or w not in VAMP_ONLY]
    if isinstance(what, str):
        what = [what]
    unknown = [w for w in what if w not in ALL]
    if unknown or not what:
        raise PathanatError(f"--what: expected some of {', '.join(ALL)}, got {list(what)!r}")
    if "clusters" in what:
        require_vamp(model)
    return list(dict.fromkeys(what))


def check_counts(**counts: int) -> None:
    for name, value in counts.items():
        checked_int(value, "--" + name.replace("_", "-"))


def check_temperatures(temperatures: Sequence[float], name: str) -> None:
    bad = [t for t in temperatures
           if not (isinstance(t, int | float | np.floating) and 0 < t < math.inf)]
    if not temperatures or bad:
        raise PathanatError(f"--{name}: expected positive numbers, got {list(temperatures)!r}")


@one_at_a_time("synthesize")
def synthesize_run(
    run: str | os.PathLike,
    what: Sequence[str] | None = None,
    pathology_groups: Collection[int] | None = None,
    split: str = SPLIT,
    seed: int = SEED,
    temperatures: Sequence[float] = TEMPERATURES,
    temperature: float = TEMPERATURE,
    samples: int = PRIOR_SAMPLES,
    draws: int = DRAWS,
    pairs: int = STYLE_MIX_PAIRS,
    per_cluster: int = PER_CLUSTER,
    progress: bool = True,
) -> dict:
    """Draw the synthesis figures ``what`` (default: all the run's kind supports) of the run
    folder ``run`` from its cache's ``split``.

    ``temperatures``: rows of ``prior``; ``temperature``: of the prior draws in ``layers`` and
    ``conditional``; ``samples`` per temperature; ``draws`` per row of ``layers`` and
    ``conditional``; ``pairs`` of ``style-mix``; ``per_cluster`` slices shown per component.
    Writes ``RUN/figures/synth_<what>.png`` (+ ``.txt`` caption) and merges into
    ``RUN/synthesis.json``. Example: ``synthesize_run("runs/nvmp", ["style-mix"], [2])``.
    """
    opened = open_run(run)
    folder, model, config = opened.folder, opened.model, opened.config
    what = checked_what(what, model)
    check_counts(samples=samples, draws=draws, pairs=pairs, per_cluster=per_cluster)
    check_temperatures(temperatures, "temperatures")
    check_temperatures([temperature], "temperature")
    groups, source = None, None
    if pathology_groups is not None or set(what) & set(NEEDS_PATHOLOGY):
        groups, source = resolve_pathology_groups(
            pathology_groups, config.model, folder / ANALYSIS_JSON
        )
    path = folder / SYNTHESIS_JSON
    # read before drawing: a broken file stops the command before any work
    old = read_json(path, "delete it to start afresh") if path.is_file() else {}
    data = split_arrays(opened.cache, split)
    chosen = choose_pairs(data, pairs, seed) if set(what) - {"prior", "clusters"} else []
    kind = config.model.kind
    second_stage = opened.second_stage(seed) if set(what) & set(SECOND_STAGE) else None
    request = Request(model, data, chosen, groups, seed, tuple(temperatures), temperature,
                      samples, draws, per_cluster, second_stage)
    settings: dict[str, dict] = {}
    for name in tqdm(what, desc="synthesize", delay=2.0, disable=not progress):
        fig, caption, used = FIGURES[name](request)
        save_figure(fig, folder / figure_path(name), caption=f"{kind}: {caption}")
        settings[name] = {"seed": seed, "split": split, **used}

    summary = {
        "run": str(folder),
        "model": kind,
        "pathology_groups": groups if groups is not None else old.get("pathology_groups"),
        "pathology_source": source if source is not None else old.get("pathology_source"),
        "figures": {**old.get("figures", {}), **{w: figure_path(w) for w in what}},
        "seed": seed,
        "settings": {**old.get("settings", {}), **settings},
    }
    write_json(path, summary)
    return summary
