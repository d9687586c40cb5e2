"""Wall time of training the cohort segmenters and of scoring N prior samples, with accuracy.

Trains the tissue and lesion segmenters on CACHE's train split (``--steps``, default the
library's) without saving them, prints their test-split accuracy, then times
``sample_validity`` for each N of ``--samples``: prior draws of the run ``--run`` (its own
cost, model-dependent) plus segmentation of the samples and the real test slices. Without
``--run`` only segmentation is timed (N real slices, tiled). ``--threads`` sets torch's threads.
Timings taken while other jobs share the cores are inflated: the load average is printed.

    .venv/bin/python benchmarks/bench_validity.py CACHE [--run RUN] [--samples 64,256]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from pathanat.data.prepare import load_cache
from pathanat.evaluation.segmenters import STEPS, segment, train_segmenters
from pathanat.evaluation.validity import sample_validity
from pathanat.runs import load_trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--run", help="a run folder on this cache, for prior-sample timings")
    parser.add_argument("--samples", default="64,256", help="comma-separated N")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = load_cache(args.cache)
    load = os.getloadavg()[0]

    wall, cpu = time.perf_counter(), time.process_time()
    segs = train_segmenters(cache, steps=args.steps, progress=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    acc = segs.accuracy
    train = cache.split("train")
    print(f"\ncache {cache.path}: {len(train)} train slices of {cache.shape[0]} x "
          f"{cache.shape[1]}; {acc['slices']} test slices; torch threads {args.threads}; "
          f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} now")
    print("\n| step | N | wall s | CPU s |\n|---|---|---|---|")
    print(f"| train segmenters ({args.steps} steps) | - | {wall:.1f} | {cpu:.1f} |")

    model = load_trained(args.run)[0] if args.run else None
    test = cache.split("test")
    for n in (int(v) for v in args.samples.split(",")):
        start, cpu = time.perf_counter(), time.process_time()
        if model is None:
            images = np.resize(np.asarray(test.image), (n, *cache.shape))
            segment(segs, images)
            what = "segment N slices"
        else:
            sample_validity(model, segs, test, n=n)
            what = "sample_validity (draw + segment N, segment test)"
        print(f"| {what} | {n} | {time.perf_counter() - start:.1f} | "
              f"{time.process_time() - cpu:.1f} |")

    print("\n| label | test Dice |\n|---|---|")
    for name, value in acc["tissue_dice"].items():
        print(f"| {name} | {value:.3f} |")
    print(f"| tissue accuracy (majority rate {acc['tissue_majority_rate']:.3f}) | "
          f"{acc['tissue_accuracy']:.3f} |")
    for name in ("lesion_dice", "lesion_precision", "lesion_recall"):
        print(f"| {name} | {acc[name]:.3f} |")


if __name__ == "__main__":
    main()
