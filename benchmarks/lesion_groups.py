"""Which latent group carries the lesions that the second stage's span loses, and where the
misplaced ones come from.

The test slices' codes of a trained MS run are decoded with some groups projected onto the
second stage's span (what a perfect density in that span would draw) and the others the
slice's own; each mix is scored through the cohort's segmenters: lesion-like voxels, and the
fraction of them in background, CSF or ventricles (invalid), with its bootstrap interval over
slices as ``pathanat validity`` gives it. Rows: all projected, all own (the reconstructions),
each group alone own, each group alone projected, and the last two groups own.

Measured on the nineteenth round's cpu-grid nvmp_ms_sup (docs/generation.md, twentieth round;
960 test slices; 163 s after loading, alone on 2 cores of an AMD EPYC): the lesions live in
z_2 (z_P), whose own residual alone brings back 31 556 lesion voxels (real slices 23 516) where
the span keeps 5 918; the span gives z_2 about 11 of its 128 directions.

    python benchmarks/lesion_groups.py RUN
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pathanat.evaluation.evaluate import batches, split_arrays
from pathanat.evaluation.segmenters import cohort_segmenters
from pathanat.evaluation.validity import segmented, validity_rates
from pathanat.models.second_stage import model_codes, split_groups
from pathanat.runs import open_run

BATCH = 64


def mixes(groups: int) -> dict[str, list[bool]]:
    """Row name -> per group, True where the slice's own residual is kept."""
    out = {"all projected": [False] * groups, "all own (reconstructions)": [True] * groups}
    for g in range(groups):
        out[f"z_{g} own only"] = [i == g for i in range(groups)]
    for g in range(groups):
        out[f"z_{g} projected only"] = [i != g for i in range(groups)]
    out[f"z_{groups - 2}, z_{groups - 1} own"] = [i >= groups - 2 for i in range(groups)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained run folder of an MS cohort")
    args = parser.parse_args()
    torch.set_num_threads(2)
    opened = open_run(args.run)
    cache = opened.lesion_cache("lesion groups")
    segmenters = cohort_segmenters(cache, progress=False)
    images = np.array(split_arrays(cache, "test").image, dtype=np.float32)
    prior = opened.second_stage(0)
    clock = time.perf_counter()
    codes, shapes = model_codes(opened.model, images, BATCH)
    own, projected = split_groups(codes, shapes), prior.project(codes)
    share = [float(part.pow(2).sum()) for part in split_groups(prior.directions, shapes)]
    print(f"{args.run}: {len(images)} test slices; groups {shapes}; the span's "
          f"{prior.directions.shape[0]} directions per group (squared norms): "
          + ", ".join(f"z_{g} {s:.1f}" for g, s in enumerate(share)))
    real = segmented(segmenters, images, BATCH)
    rows = {"real slices": validity_rates(real.lesion, real.tissue, 0)}
    with torch.no_grad():
        for name, keep in mixes(len(shapes)).items():
            decoded = np.concatenate([
                opened.model.from_residuals(
                    [(own if k else projected)[g][part] for g, k in enumerate(keep)],
                    images.shape[1:]).x_mean[:, 0].numpy()
                for part in batches(len(images), BATCH)])
            scored = segmented(segmenters, decoded, BATCH)
            rows[name] = validity_rates(scored.lesion, scored.tissue, 0)
    print(f"{'decoded':28s} {'lesion voxels':>14s}  invalid [95%]")
    for name, r in rows.items():
        print(f"{name:28s} {r['lesion_voxels']:14d}  {r['invalid_fraction']:.3f} "
              f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    print(f"{time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
