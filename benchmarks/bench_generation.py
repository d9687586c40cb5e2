"""Wall time until prior samples are brains: training time per kind until 90% of prior samples
pass the brain-shape test (``evaluation.plausibility``) at some temperature <= 1.

Each kind's packaged MS config is trained under the ``cpu`` budget of `pathanat reproduce` (the
same overrides, so this times the grid's recipe) on one phantom cache, in chunks of ``--every``
steps (`train`, then `train --resume`); after each chunk 256 prior samples per temperature are
drawn and tested and the test PSNR of 64 slices is measured. Only training counts toward the
wall time (the measurements between chunks do not). A kind that never reaches 90% by
``--max-steps`` is reported as such. Run it alone: timings taken while other jobs share the cores
are inflated; the load average is printed beside them.

    .venv/bin/python benchmarks/bench_generation.py [--kinds vae nvae nvmp nvmpplus]
        [--subjects 60] [--every 100] [--max-steps 600] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pathanat.data.prepare import load_cache
from pathanat.evaluation.evaluate import SAMPLE_TEMPERATURES
from pathanat.evaluation.plausibility import brain_like, brain_references
from pathanat.experiment import load_experiment
from pathanat.metrics import psnr
from pathanat.reproduce import BUDGETS, KINDS, run_config
from pathanat.runs import load_trained, phantom_paths
from pathanat.training.run import make_phantom_cache, resume, train_config

warnings.filterwarnings("ignore")
TARGET = 0.9
SAMPLES = 256


def cache_for(data: Path, subjects: int) -> Path:
    """The cpu budget's phantom cache with ``subjects`` subjects under ``data`` (made once)."""
    config = load_experiment("nvmp_ms", [f"data.phantom.subjects={subjects}",
                                         f"data.data_dir={data}"])
    cohort, cache = phantom_paths(config, data)
    make_phantom_cache(config, cohort, cache)
    return cache


def measured(run: Path, references: np.ndarray, test: np.ndarray) -> dict:
    model, _ = load_trained(run)
    model = model.float().eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        fractions = {
            t: float(brain_like(model.sample(SAMPLES, t).x_mean[:, 0].numpy(), references)[0]
                     .mean())
            for t in SAMPLE_TEMPERATURES
        }
        recon = model.reconstruct(torch.from_numpy(test)[:, None])[:, 0].numpy()
    return {"brain_like": fractions, "psnr": float(psnr(test, recon).mean())}


def time_kind(kind: str, cache: Path, out: Path, every: int, max_steps: int | None) -> dict:
    base = run_config(f"{kind}_ms", BUDGETS["cpu"], out, cache)
    max_steps = max_steps or base.trainer.max_steps
    # trained in pieces: the lr decays over the budget's run, not over each piece
    base.optim.decay_steps = base.trainer.max_steps
    data = load_cache(cache)
    references = brain_references(data)
    test = np.array(data.split("test").image[:64], dtype=np.float32)
    run, seconds, history = out / kind, 0.0, []
    for steps in range(every, max_steps + 1, every):
        start = time.perf_counter()
        if steps == every:
            base.trainer.max_steps = steps
            base.trainer.progress_bar = False
            train_config(base, run, overwrite=True)
        else:
            resume(run, [f"trainer.max_steps={steps}"])
        seconds += time.perf_counter() - start
        m = measured(run, references, test)
        history.append({"steps": steps, "train_s": round(seconds, 1), **m})
        best_t, best = max(m["brain_like"].items(), key=lambda kv: kv[1])
        print(f"  {kind:9s} step {steps:5d}  train {seconds:7.1f} s  PSNR {m['psnr']:5.2f} dB  "
              "brain-like " + "  ".join(f"T={t}: {f:.2f}" for t, f in m["brain_like"].items()),
              flush=True)
        if best >= TARGET:
            return {"kind": kind, "steps": steps, "train_s": seconds, "temperature": best_t,
                    "fraction": best, "psnr": m["psnr"], "history": history}
    return {"kind": kind, "steps": None, "train_s": seconds, "temperature": None,
            "fraction": None, "psnr": history[-1]["psnr"], "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--subjects", type=int, default=BUDGETS["cpu"].subjects)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--max-steps", type=int, help="default: the cpu budget's steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "pathanat-bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = cache_for(args.data, args.subjects)
    print(f"cpu: {os.cpu_count()} cores, torch threads {args.threads}; cache {cache}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            rows.append(time_kind(kind, cache, Path(tmp), args.every, args.max_steps))
    load = os.getloadavg()
    print(f"\nwall time to {TARGET:.0%} brain-like prior samples ({SAMPLES} per temperature, "
          f"temperatures {', '.join(map(str, SAMPLE_TEMPERATURES))}); measured every "
          f"{args.every} steps; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'kind':10s} {'steps':>6s} {'train s':>8s} {'T':>4s} {'brain-like':>10s} "
          f"{'PSNR dB':>8s}")
    for r in rows:
        reached = r["steps"] is not None
        print(f"{r['kind']:10s} {r['steps'] if reached else 'never':>6} {r['train_s']:8.1f} "
              f"{r['temperature'] if reached else '-':>4} "
              f"{r['fraction'] if reached else 0:10.2f} {r['psnr']:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
