"""Training throughput and peak memory of the engine, per model kind, fp32 vs bf16 + channels_last.

Each row is one run of `HVAEModule` under a Lightning Trainer (manual optimisation, logging on,
validation off) at the paper's size: 96 x 112 slices, 5 groups x 2 latent channels, the default
width and cells, batch 16. Slices/s is measured over ``--steps`` steps after ``--warmup`` steps;
peak memory is the process's max RSS (each row runs in a fresh process). ``--compile`` adds rows
with ``torch.compile`` on the model; ``--demo`` also times ``pathanat demo`` end to end in a fresh
folder. Timings taken while other jobs share the cores are inflated: the load average is printed.

    .venv/bin/python benchmarks/bench_training.py [--threads 2] [--kinds nvae nvmp] [--demo]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Dataset

SIZE = (96, 112)


class SmoothSlices(Dataset):
    """Fixed smooth random images (a brain-like blob plus texture), standardised."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE[0]), torch.linspace(-1, 1, SIZE[1]),
                                indexing="ij")
        blob = ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 < 1).float()
        noise = torch.nn.functional.avg_pool2d(torch.randn(n, 1, *SIZE, generator=g), 5, 1, 2)
        images = blob * (1 + 3 * noise)
        self.images = (images - images.mean()) / images.std()
        self.brain = blob.expand(n, 1, *SIZE)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "brain": self.brain[i]}


def measure(kind: str, mode: str, threads: int, warmup: int, steps: int, batch: int, queue) -> None:
    import logging
    import warnings

    import lightning.pytorch as pl

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # keep the table readable
    warnings.filterwarnings("ignore")

    from pathanat.config import from_dict
    from pathanat.experiment import ExperimentConfig
    from pathanat.training.module import HVAEModule

    torch.set_num_threads(threads)
    precision = "32" if mode == "fp32" else "bf16-mixed"
    config = from_dict(ExperimentConfig, {
        "data": {"cache": "unused", "batch_size": batch},
        "model": {"kind": kind, "image_size": list(SIZE)},
        "trainer": {"max_steps": warmup + steps, "precision": precision},
    })
    module = HVAEModule(config)
    if mode.endswith("compile"):
        module.model = torch.compile(module.model)
    marks: dict[int, float] = {}

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            marks[trainer.global_step] = time.perf_counter()

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=config.trainer.precision,
        max_steps=warmup + steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
        log_every_n_steps=50,
    )
    loader = DataLoader(SmoothSlices(), batch_size=batch, shuffle=True, drop_last=True)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    end = time.perf_counter()
    measured = end - marks.get(warmup, start)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    queue.put((steps * batch / measured, rss_mb, module.skipped_steps))


def run_row(kind: str, mode: str, args: argparse.Namespace) -> tuple[float, float, int] | None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=measure,
        args=(kind, mode, args.threads, args.warmup, args.steps, args.batch, queue),
    )
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 and not queue.empty() else None


def time_demo() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "pathanat"), "demo", "--out",
             os.path.join(tmp, "demo")],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--kinds", nargs="+", default=["vae", "nvae", "nvmp", "nvmp+"])
    parser.add_argument("--compile", action="store_true", help="add bf16 + torch.compile rows")
    parser.add_argument("--demo", action="store_true", help="also time `pathanat demo`")
    args = parser.parse_args()
    modes = ["fp32", "bf16"] + (["bf16+compile"] if args.compile else [])
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"{args.threads} threads, batch {args.batch}, {SIZE[0]} x {SIZE[1]}, "
          f"{args.steps} timed steps after {args.warmup}")
    print(f"{'kind':<7}{'mode':<14}{'slices/s':>10}{'s/step':>9}{'peak RSS MB':>13}{'skipped':>9}")
    for kind in args.kinds:
        for mode in modes:
            row = run_row(kind, mode, args)
            if row is None:
                print(f"{kind:<7}{mode:<14}{'failed':>10}")
                continue
            rate, rss, skipped = row
            print(f"{kind:<7}{mode:<14}{rate:>10.1f}{args.batch / rate:>9.2f}{rss:>13.0f}"
                  f"{skipped:>9d}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.demo:
        print(f"pathanat demo end to end: {time_demo() / 60:.1f} min "
              f"(load average after: {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
