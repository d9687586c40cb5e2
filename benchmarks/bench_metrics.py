"""Time of the evaluation metrics at the project's sizes; prints one table.

- PSNR + SSIM (whole slice and inside a brain mask) of N slices of 96 x 112;
- FID Inception features of N slices (fp32, batch 50) and the Frechet distance between two sets
  of 2048-d features: sample-space ``fid`` and the covariance route ``frechet_distance`` (sqrtm);
- Table-4 Lasso R^2 (1200 train / 400 test, 5 latent groups pooled to 2 x 6 x 7, 4 targets) and
  the same for one unpooled group z2 (2 x 24 x 28 = 1344 features);
- DCI (lasso and forest) on the 5 pooled groups' 420 codes against 4 factors.

Inputs are random arrays of realistic shape (timing does not depend on content, except Lasso's
iterations). Timings taken while other jobs share the cores are inflated.

    .venv/bin/python benchmarks/bench_metrics.py [--slices 2000] [--fid-slices 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pathanat.evaluation import fid, latents, reconstruction

SHAPE = (96, 112)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def brain_slices(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    mask = ((yy - 48) / 40) ** 2 + ((xx - 56) / 46) ** 2 < 1
    images = np.where(mask, rng.normal(size=(n, *SHAPE)), -2.5).astype(np.float32)
    return images, np.broadcast_to(mask, images.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=2000, help="slices for PSNR/SSIM")
    parser.add_argument("--fid-slices", type=int, default=2000, help="slices for FID features")
    parser.add_argument("--device", default="cpu", help="device for the Inception network")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []

    ref, mask = brain_slices(args.slices, rng)
    rec = ref + 0.1 * rng.normal(size=ref.shape).astype(np.float32)
    _, t = timed(lambda: reconstruction.reconstruction_table(ref, rec, mask))
    rows.append(("PSNR+SSIM whole+brain", f"{args.slices} x 96x112", t, t / args.slices))

    net = fid.load_inception(args.device)
    images = ref[: args.fid_slices]
    if args.device.startswith("cuda"):
        fid.inception_features(images[:50], extractor=net)  # warm-up: cuDNN autotuning
        torch.cuda.synchronize()
    _, t = timed(lambda: fid.inception_features(images, extractor=net, progress=True))
    rows.append((f"FID features ({args.device})", f"{len(images)} x 96x112", t, t / len(images)))

    fa = rng.normal(size=(2000, 2048)) ** 2
    fb = fa + 0.1 * rng.normal(size=fa.shape)
    _, t = timed(lambda: fid.fid(fa, fb))
    rows.append(("fid (sample-space SVD)", "2000 vs 2000 x 2048", t, None))
    stats = fid.feature_statistics(fa), fid.feature_statistics(fb)
    _, t = timed(lambda: fid.frechet_distance(*stats[0], *stats[1]))
    rows.append(("frechet_distance (sqrtm)", "2048-d", t, None))

    n_train, n_test = 1200, 400
    pooled = {f"z{g}": rng.normal(size=(n_train + n_test, 2, 6, 7)) for g in range(5)}
    factors = rng.normal(size=(n_train + n_test, 4))
    # targets depend on z2 so the Lasso has something to find
    factors[:, 0] += pooled["z2"].reshape(n_train + n_test, -1)[:, :10].sum(axis=1)
    targets = {f"t{j}": 100 * factors[:, j] for j in range(4)}
    split = {name: (v[:n_train], v[n_train:]) for name, v in pooled.items()}
    tsplit = {name: (v[:n_train], v[n_train:]) for name, v in targets.items()}
    _, t = timed(
        lambda: latents.informativeness_table(
            {k: v[0] for k, v in split.items()},
            {k: v[0] for k, v in tsplit.items()},
            {k: v[1] for k, v in split.items()},
            {k: v[1] for k, v in tsplit.items()},
        )
    )
    rows.append(("Lasso R2 table", "5 groups x 84 x 4 targets", t, None))
    z2 = rng.normal(size=(n_train + n_test, 2, 24, 28))
    y = 100 * z2.reshape(len(z2), -1)[:, :20].sum(axis=1)
    _, t = timed(lambda: latents.lasso_r2(z2[:n_train], y[:n_train], z2[n_train:], y[n_train:]))
    rows.append(("Lasso R2 one group", "1344 features", t, None))

    codes = np.concatenate([v.reshape(len(v), -1) for v in pooled.values()], axis=1)
    labels = [name for name, v in pooled.items() for _ in range(v[0].size)]
    for method in ("lasso", "forest"):
        _, t = timed(
            lambda method=method: latents.dci(
                codes[:n_train],
                factors[:n_train],
                codes[n_train:],
                factors[n_train:],
                method=method,
                labels=labels,
            )
        )
        rows.append((f"DCI {method}", f"{codes.shape[1]} codes x 4 factors", t, None))

    print(f"\n{'metric':28s} {'size':28s} {'seconds':>9s} {'ms/slice':>9s}")
    for name, size, seconds, per in rows:
        per_text = f"{1000 * per:9.2f}" if per is not None else f"{'':9s}"
        print(f"{name:28s} {size:28s} {seconds:9.2f} {per_text}")
    print(f"(torch threads: {torch.get_num_threads()}; other jobs on the cores inflate these)")


if __name__ == "__main__":
    main()
