"""Benchmark `prepare_cohort`: wall time and peak memory to prepare N subjects.

The cohort is built once (not timed) in --work: the phantom generator's output when
--source phantom, else synthetic volumes of realistic size (1 mm MNI-like grid, 197 x 233 x 48
slab, or whole 197 x 233 x 189 volumes with --full: float32 image, brain and lesion masks, dseg,
all .nii.gz). Each preparation runs in a fresh child process; a thread there samples /proc every
200 ms for the process and all its descendants (the pool's workers), giving the peak of their
summed RSS (shared pages count in every process: an upper bound) and their CPU seconds. The
load average is printed too, because other work on the machine inflates wall time.

    python benchmarks/bench_prepare.py --subjects 100 --workers 1 2
    python benchmarks/bench_prepare.py --source synthetic --full --subjects 100
    python benchmarks/bench_prepare.py --source phantom --full --subjects 100 --register none affine

With --register, each mode is timed in turn (registration to the MNI152 template before slicing:
pathanat.data.register); the table adds the median and lowest brain-mask Dice with the template
and the number of samples flagged as outliers. Measured (100 whole-head MS phantoms, 2 workers,
2 cores shared with other jobs, load 7-8, so wall times are inflated; CPU s/subject is the
steadier figure):

    subjects register workers   wall s s/subject CPU s/subject peak RSS MB  load Dice med/min
         100     none       2     49.4     0.494         0.348         795   7.4            -
         100   affine       2    704.6     7.046         3.561        1418   8.4  0.979/0.972
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

MNI_AFFINE = np.array([[1.0, 0, 0, -98], [0, 1.0, 0, -134], [0, 0, 1.0, -72], [0, 0, 0, 1]])
DISTINCT = 4  # synthetic subjects actually drawn; the rest are file copies (same read cost)


def synthetic_subject(rng: np.random.Generator, nz: int) -> dict[str, np.ndarray]:
    """An ellipsoid brain with textured tissue, noise and a few cubic lesions on a 1 mm grid."""
    x, y, z = np.ogrid[:197, :233, :189]
    r = ((x - 98) / 70) ** 2 + ((y - 120) / 85) ** 2 + ((z - 90) / 65) ** 2
    brain = r < 1
    wm = r < 0.6
    lesion = np.zeros(brain.shape, bool)
    for _ in range(5):
        c = rng.integers([70, 90, 70], [126, 150, 110])
        h = rng.integers(2, 5)
        lesion[c[0] - h:c[0] + h, c[1] - h:c[1] + h, c[2] - h:c[2] + h] = True
    lesion &= wm
    image = np.where(brain, np.where(wm, 1000.0, 1250.0), 0.0) + 700 * lesion
    image = np.abs(image + rng.normal(0, 25, image.shape)).round()  # magnitude data
    dseg = np.where(brain, np.where(wm, 4, 3), 0)
    k0 = (189 - nz) // 2  # a slab around the brain's centre
    cut = (slice(None), slice(None), slice(k0, k0 + nz))
    return {"FLAIR": image[cut].astype(np.float32), "desc-brain_mask": brain[cut].astype(np.uint8),
            "label-lesion_mask": lesion[cut].astype(np.uint8), "dseg": dseg[cut].astype(np.uint8)}


def synthetic_cohort(out: Path, n: int, full: bool) -> Path:
    nz = 189 if full else 48
    rng = np.random.default_rng(0)
    affine = MNI_AFFINE.copy()
    affine[2, 3] += (189 - nz) // 2
    for i in range(n):
        sid = f"sub-{i:04d}"
        anat = out / sid / "anat"
        anat.mkdir(parents=True)
        if i < DISTINCT:
            for name, data in synthetic_subject(rng, nz).items():
                nib.save(nib.Nifti1Image(data, affine), anat / f"{sid}_{name}.nii.gz")
        else:
            src = out / f"sub-{i % DISTINCT:04d}" / "anat"
            for f in src.iterdir():
                shutil.copy(f, anat / f.name.replace(src.parent.name, sid))
    pd.DataFrame({"participant_id": [f"sub-{i:04d}" for i in range(n)]}).to_csv(
        out / "participants.tsv", sep="\t", index=False)
    return out


def build_cohort(work: Path, source: str, n: int, full: bool) -> Path:
    cohort = work / f"{source}-{'full' if full else 'slab'}-{n}"
    if not cohort.exists():
        if source == "phantom":
            from pathanat.data.phantom import generate_cohort

            generate_cohort("ms", n, cohort, seed=0, slab_mm=None if full else 48.0)
        else:
            synthetic_cohort(cohort, n, full)
    return cohort


def process_table() -> dict[int, tuple[int, float, float]]:
    """pid -> (parent pid, CPU seconds, RSS MB) of every process, from /proc."""
    tick, page_mb = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE") / 2**20
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        # After "pid (comm)": state ppid ... utime stime at 12, 13 ... rss (pages) at 22.
        table[int(stat.parent.name)] = (
            int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, int(fields[21]) * page_mb)
    return table


class TreeMonitor(threading.Thread):
    """Samples this process and its descendants: peak summed RSS, last CPU seconds of each."""

    def __init__(self, period_s: float = 0.2):
        super().__init__(daemon=True)
        self.period_s, self.peak_mb, self.cpu_s = period_s, 0.0, {}
        self.stopped = threading.Event()

    def run(self) -> None:
        root = os.getpid()
        while not self.stopped.is_set():
            table = process_table()
            tree, grew = {root}, True
            while grew:
                more = {pid for pid, (ppid, _, _) in table.items() if ppid in tree} - tree
                tree |= more
                grew = bool(more)
            self.peak_mb = max(self.peak_mb, sum(table[p][2] for p in tree if p in table))
            self.cpu_s.update({p: table[p][1] for p in tree if p in table})
            self.stopped.wait(self.period_s)


def measure(cohort: Path, out: Path, workers: int, register: str = "none") -> dict:
    """Run in the child process: prepare and report wall time, CPU time and peak RSS."""
    from pathanat.data.prepare import prepare_cohort

    monitor = TreeMonitor()
    monitor.start()
    start = time.perf_counter()
    prepare_cohort(cohort, out, workers=workers, progress=False, overwrite=True,
                   register=register)
    wall = time.perf_counter() - start
    monitor.stopped.set()
    monitor.join()
    own = resource.getrusage(resource.RUSAGE_SELF)
    own_cpu = own.ru_utime + own.ru_stime
    others = sum(cpu for pid, cpu in monitor.cpu_s.items() if pid != os.getpid())
    records = json.loads((out / "manifest.json").read_text())["subjects"].values()
    dice = [r["registration"]["dice"] for r in records if "registration" in r]
    return {"wall_s": wall, "cpu_s": own_cpu + others, "rss_mb": monitor.peak_mb,
            "load": os.getloadavg()[0],
            "dice": [float(np.median(dice)), min(dice)] if dice else None,
            "outliers": sum(r.get("registration", {}).get("outlier", False) for r in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--source", choices=["phantom", "synthetic"], default="synthetic")
    parser.add_argument("--full", action="store_true", help="whole 197x233x189 volumes")
    parser.add_argument("--work", type=Path, default=None, help="folder kept for the cohorts")
    parser.add_argument("--register", nargs="+", default=["none"],
                        choices=["none", "rigid", "affine"])
    parser.add_argument("--measure", nargs=4, metavar=("COHORT", "OUT", "WORKERS", "REGISTER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        cohort, out, workers, register = args.measure
        print(json.dumps(measure(Path(cohort), Path(out), int(workers), register)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    cohort = build_cohort(work, args.source, args.subjects, args.full)
    shape = nib.load(next(cohort.glob("sub-*/anat/*_FLAIR.nii.gz"))).shape
    print(f"cohort: {cohort} ({args.source}, {'x'.join(map(str, shape))} at 1 mm), "
          f"{os.cpu_count()} cores")
    header = (f"{'subjects':>8} {'register':>8} {'workers':>7} {'wall s':>8} {'s/subject':>9} "
              f"{'CPU s/subject':>13} {'peak RSS MB':>11} {'load':>5} {'Dice med/min':>12} "
              f"{'outliers':>8}")
    print(header)
    print("-" * len(header))
    for register in args.register:
        for workers in args.workers:
            result = subprocess.run(
                [sys.executable, __file__, "--measure", str(cohort), str(work / "cache"),
                 str(workers), register], check=True, capture_output=True, text=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            dice = "-" if r["dice"] is None else f"{r['dice'][0]:.3f}/{r['dice'][1]:.3f}"
            print(f"{args.subjects:>8} {register:>8} {workers:>7} {r['wall_s']:>8.1f} "
                  f"{r['wall_s'] / args.subjects:>9.3f} {r['cpu_s'] / args.subjects:>13.3f} "
                  f"{r['rss_mb']:>11.0f} {r['load']:>5.1f} {dice:>12} {r['outliers']:>8}",
                  flush=True)
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
