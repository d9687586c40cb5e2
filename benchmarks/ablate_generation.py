"""One-factor ablation of the generation recipe (docs/generation.md): does a model's prior draw
brains?

Each row trains the demo's model (``configs/demo.yaml``, the recipe) with one thing changed, on
the demo's 30-subject phantom, in a plain loop over the same model and objective as the training
engine (so a row can change what the engine's config does not expose), and measures: test PSNR
of 64 slices, the fraction of brain-like prior samples (``plausibility``; 64 per temperature) at
T = 0.4 .. 1.0, and the KL per group. Training time excludes the measurements. Run it alone:
timings taken while other jobs share the cores are inflated; the load average is printed.

    .venv/bin/python benchmarks/ablate_generation.py [--rows recipe encoder ...] [--steps 350]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pathanat.data.prepare import load_cache
from pathanat.evaluation.plausibility import brain_like, brain_references
from pathanat.experiment import load_experiment
from pathanat.metrics import psnr
from pathanat.models import HierarchicalVAE, objectives
from pathanat.runs import phantom_paths
from pathanat.training.run import make_phantom_cache

warnings.filterwarnings("ignore")
TEMPERATURES = (0.4, 0.6, 0.8, 1.0)
# row -> overrides of the demo config (dotted keys, as `pathanat train` takes them)
ROWS = {
    "recipe": [],
    "encoder": ["model.posterior=encoder"],
    "uniform": ["model.widths=null", "model.cells=null"],
    "rise200": ["objective.kl_cycle=400"],
    "constant-lr": ["optim.lr_decay=none"],
    "fullres-cell": ["model.cells=[2,2,1,1,1]"],
    "fullres-w8": ["model.widths=[64,64,32,16,8]"],
    "beta1": ["objective.kl_start=1.0"],
    "lr2e-3": ["optim.lr=2e-3"],
    "vae": ["model.kind=vae"],
    "nvae": ["model.kind=nvae"],
    "nvmp+": ["model.kind=nvmp+"],
    # main before the generation work, but with the corrected KL balancing (the old form is gone)
    "main": ["model.posterior=encoder", "model.widths=null", "model.cells=null",
             "optim.lr=2e-3", "optim.warmup_steps=0"],
}


def cache_for(data: Path) -> Path:
    """The demo's phantom cache under ``data`` (made once)."""
    config = load_experiment("demo", [f"data.data_dir={data}"])
    cohort, cache = phantom_paths(config, data)
    make_phantom_cache(config, cohort, cache)
    return cache


def measure(model: HierarchicalVAE, test: np.ndarray, references: np.ndarray) -> dict:
    model.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(123)
        recon = model.reconstruct(torch.from_numpy(test)[:, None])[:, 0].numpy()
        fractions = {t: float(brain_like(model.sample(64, t).x_mean[:, 0].numpy(),
                                         references)[0].mean()) for t in TEMPERATURES}
    model.train()
    return {"psnr": float(psnr(test, recon).mean()), "brain_like": fractions}


def run_row(name: str, cache: Path, steps: int, seed: int = 0) -> dict:
    config = load_experiment("demo", [f"data.cache={cache}", "data.phantom=null", *ROWS[name]])
    torch.manual_seed(seed)
    data = load_cache(cache)
    train = torch.from_numpy(np.array(data.split("train").image, dtype=np.float32))[:, None]
    test = np.array(data.split("test").image[:64], dtype=np.float32)
    references = brain_references(data)
    model = HierarchicalVAE(config.model)
    layout = torch.channels_last if config.trainer.use_channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    if model.pseudo_inputs is not None:
        model.init_pseudo_inputs(train[torch.randperm(len(train))[: config.model.pseudo_inputs]])
    optim, objective = config.optim, config.objective
    adam = torch.optim.Adam(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    rng = np.random.default_rng(seed)
    seconds, rows = 0.0, []
    for step in range(steps):
        start = time.perf_counter()
        x = train[rng.integers(0, len(train), config.data.batch_size)].contiguous(
            memory_format=layout)
        out = model(x)
        beta = objectives.kl_weight(step, objective.kl_cycle, objective.kl_start)
        terms = objectives.elbo_terms(out, x, config.model.kind)
        loss = objectives.training_loss(terms, objectives.group_sizes(out), beta,
                                        balance=objective.kl_balance)
        lr = optim.learning_rate(step, steps)
        for group in adam.param_groups:
            group["lr"] = lr
        adam.zero_grad(set_to_none=True)
        loss.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip or float("inf"))
        if torch.isfinite(norm) and torch.isfinite(loss.loss):
            adam.step()
        seconds += time.perf_counter() - start
        if (step + 1) % (steps // 2) == 0:
            m = measure(copy.deepcopy(model), test, references)
            rows.append({"row": name, "steps": step + 1, "train_s": seconds, **m,
                         "kl": out_kl(out)})
            print(f"  {name:12s} step {step + 1:4d}  {seconds:6.1f} s  PSNR {m['psnr']:5.2f}  "
                  + "  ".join(f"T={t}: {f:.2f}" for t, f in m["brain_like"].items()), flush=True)
    return rows[-1]


def out_kl(out) -> list[float]:
    return [round(float(g), 1) for g in objectives.group_kl(out).detach().mean(0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=350)  # the demo's
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "pathanat-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = cache_for(args.data)
    results = [run_row(name, cache, args.steps) for name in args.rows]
    load = os.getloadavg()
    print(f"\n{args.steps} steps, batch 16, fp32, {args.threads} threads; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'row':12s} {'train s':>8s} {'PSNR':>6s} "
          + " ".join(f"{'T=' + str(t):>6s}" for t in TEMPERATURES) + "  KL per group (nats)")
    for r in results:
        print(f"{r['row']:12s} {r['train_s']:8.1f} {r['psnr']:6.2f} "
              + " ".join(f"{r['brain_like'][t]:6.2f}" for t in TEMPERATURES) + f"  {r['kl']}")


if __name__ == "__main__":
    main()
