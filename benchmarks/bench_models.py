"""Speed and memory of the four hierarchical VAEs at the paper's size, on CPU.

For each kind (5 groups, 2 latent channels, one 96 x 112 slice, default width and cells) it prints
a table of: forward+backward time per slice and peak extra memory for a batch of 16, in fp32
(default layout) and in bf16 autocast with channels_last; the effective conv throughput (conv FLOPs
of forward+backward, counted as 3x the forward's, divided by the wall time: how close a step is to
being conv-bound); and the importance-weighted NLL at S = 100 (time per slice).

Each measurement runs in a fresh process, so peak memory (max RSS growth over the model and batch
being built) is its own. Timings taken while other jobs share the cores are inflated.

    .venv/bin/python benchmarks/bench_models.py [--threads 2] [--steps 5] [--kinds vae nvmp]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import resource
import time

import torch
from torch import nn

from pathanat.models import KINDS, HierarchicalVAE, HVAEConfig, objectives

SIZE = (96, 112)


def conv_flops_per_forward(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-add FLOPs (2 per MAC) of every Conv2d in one forward pass, counted with hooks."""
    total = 0.0

    def hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += 2.0 * module.in_channels * k * output.numel() / module.groups

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(kind: str, mode: str, threads: int, steps: int, batch: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HierarchicalVAE(HVAEConfig(kind=kind, image_size=SIZE))
    x = torch.randn(batch, 1, *SIZE)
    bf16 = mode == "bf16"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    flops = conv_flops_per_forward(model, x)
    base = _peak_rss_mb()

    def step() -> None:
        with autocast:
            out = model(x)
            terms = objectives.elbo_terms(out, x, kind)
            loss = objectives.training_loss(terms, objectives.group_sizes(out), beta=0.5).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: oneDNN picks kernels, the allocator grows
    start = time.perf_counter()
    for _ in range(steps):
        step()
    train_s = (time.perf_counter() - start) / steps
    peak = _peak_rss_mb() - base

    iw_batch = 4
    with autocast:
        model.importance_weighted_log_likelihood(x[:iw_batch], samples=4)  # warm-up
        start = time.perf_counter()
        model.importance_weighted_log_likelihood(x[:iw_batch], samples=100)
    iw_s = (time.perf_counter() - start) / iw_batch
    queue.put(
        dict(
            kind=kind,
            mode=mode,
            params=model.num_parameters(),
            ms_per_slice=1e3 * train_s / batch,
            peak_mb=peak,
            tflops=3 * flops / train_s / 1e12,
            iw_ms_per_slice=1e3 * iw_s,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(
        f"{'kind':6} {'mode':5} {'params':>8} {'fwd+bwd ms/slice':>17} {'peak MB (B=16)':>15} "
        f"{'conv TFLOP/s eff.':>18} {'IW S=100 ms/slice':>18}"
    )
    for kind in args.kinds:
        for mode in ("fp32", "bf16"):
            queue = ctx.Queue()
            proc = ctx.Process(
                target=measure, args=(kind, mode, args.threads, args.steps, args.batch, queue)
            )
            proc.start()
            r = queue.get()
            proc.join()
            print(
                f"{r['kind']:6} {r['mode']:5} {r['params']:8d} {r['ms_per_slice']:17.1f} "
                f"{r['peak_mb']:15.0f} {r['tflops']:18.3f} {r['iw_ms_per_slice']:18.0f}"
            )


if __name__ == "__main__":
    main()
