"""Time and peak memory of writing a phantom cohort (default: 100 MS subjects, 48 mm slabs).

    .venv/bin/python benchmarks/bench_phantom.py --subjects 100

Target: under 5 minutes for 100 MS slabs on 2 cores. The generator runs in one process; its CPU
time is printed beside the wall time, with the load average, because other work on the machine
inflates wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from pathanat.data.phantom import generate_cohort
from pathanat.data.templates import load_template


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--kind", choices=["ms", "ad"], default="ms")
    parser.add_argument("--slab-mm", type=float, default=48.0)
    args = parser.parse_args()

    start = time.perf_counter()
    load_template()
    setup = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        out = generate_cohort(
            args.kind, args.subjects, Path(tmp) / "cohort", slab_mm=args.slab_mm, progress=False
        )
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20

    print(f"phantom {args.kind}, {args.slab_mm:g} mm slabs, template load {setup:.1f} s, "
          f"cohort {size_mb:.0f} MB on disk, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"| {'subjects':>8} | {'wall s':>8} | {'s/subject':>9} | {'CPU s/subject':>13} "
          f"| {'peak RSS MB':>11} |")
    print(f"| {'-' * 8} | {'-' * 8} | {'-' * 9} | {'-' * 13} | {'-' * 11} |")
    print(f"| {args.subjects:>8} | {wall:>8.1f} | {wall / args.subjects:>9.2f} | "
          f"{cpu / args.subjects:>13.2f} | {peak_rss_mb():>11.0f} |")


if __name__ == "__main__":
    main()
