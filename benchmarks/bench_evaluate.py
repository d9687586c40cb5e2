"""Wall time of `evaluate_run` and `analyze_run` on a phantom's test split, split by cost.

A phantom of ``--subjects`` MS subjects is generated and prepared once under ``--data`` at the
default slice shape (96 x 112, 24 slices a subject; 60/20/20 % of subjects in train/val/test) and
reused. A default-size model of ``--kind`` is trained for 2 steps: its weights do not change the
cost of evaluating it, only the numbers, which this benchmark does not report. Costs come from
the ``seconds`` entries the two functions return: evaluate = NLL (importance-weighted, S =
``--iw-samples``) / reconstruction metrics / FID (prior samples + Inception features of inputs,
reconstructions and samples); analyze = encoding train and test / Lasso R^2 tables / DCI /
sensitivity. ``--threads`` sets torch's threads. Timings taken while other jobs share the cores
are inflated: the load average is printed.

    .venv/bin/python benchmarks/bench_evaluate.py [--subjects 100] [--threads 2] [--iw-samples 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pathanat.data.phantom import generate_cohort
from pathanat.data.prepare import load_cache, prepare_cohort
from pathanat.evaluation.analyze import analyze_run
from pathanat.evaluation.evaluate import DEFAULT_IW_SAMPLES, evaluate_run
from pathanat.experiment import DataConfig, ExperimentConfig, TrainerConfig
from pathanat.models import HVAEConfig
from pathanat.training.run import train_config

warnings.filterwarnings("ignore")


def cache_for(data: Path, subjects: int) -> Path:
    cohort, cache = data / f"ms-n{subjects}" / "cohort", data / f"ms-n{subjects}" / "cache"
    if not (cohort / "participants.tsv").is_file():
        start = time.perf_counter()
        generate_cohort("ms", subjects, cohort, seed=0, progress=True)
        print(f"phantom: {time.perf_counter() - start:.0f} s (not part of the table)")
    if not (cache / "manifest.json").is_file():
        prepare_cohort(cohort, cache, progress=True, workers=1)
    return cache


def run_for(cache: Path, kind: str, out: Path) -> Path:
    config = ExperimentConfig(
        data=DataConfig(cache=cache, batch_size=4),
        model=HVAEConfig(kind=kind),
        trainer=TrainerConfig(max_steps=2, accelerator="cpu", val_every=1000,
                              checkpoint_every=2, progress_bar=False),
    )
    return train_config(config, out / kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--kind", default="nvmp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iw-samples", type=int, default=DEFAULT_IW_SAMPLES)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bench-eval")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = cache_for(args.data, args.subjects)
    manifest = load_cache(cache).manifest
    n_test = len(manifest["splits"]["test"]) * manifest["parameters"]["n_slices"]
    n_train = len(manifest["splits"]["train"]) * manifest["parameters"]["n_slices"]
    run = run_for(cache, args.kind, Path(tempfile.mkdtemp(prefix="bench-eval-run-")))

    start = time.perf_counter()
    metrics = evaluate_run(run, iw_samples=args.iw_samples, progress=False)
    eval_s = time.perf_counter() - start
    start = time.perf_counter()
    analysis = analyze_run(run)
    analyze_s = time.perf_counter() - start

    print(f"\n{args.subjects}-subject MS phantom, {args.kind} (default size), torch threads "
          f"{args.threads}, load average {os.getloadavg()[0]:.1f}")
    print(f"test split: {n_test} slices; train split: {n_train} slices; S = {args.iw_samples}")
    print(f"{'step':<34}{'seconds':>10}")
    for name, value in metrics["seconds"].items():
        print(f"{'evaluate: ' + name:<34}{value:>10.1f}")
    print(f"{'evaluate: total (with I/O)':<34}{eval_s:>10.1f}")
    for name, value in analysis["seconds"].items():
        print(f"{'analyze: ' + name:<34}{value:>10.1f}")
    print(f"{'analyze: total (with I/O, figures)':<34}{analyze_s:>10.1f}")


if __name__ == "__main__":
    main()
