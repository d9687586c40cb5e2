"""`pathanat demo`: the main job end to end on a small embedded phantom MS cohort.

phantom cohort -> slice cache -> a small NVMP trained (the packaged `demo` config,
configs/demo.yaml) -> evaluate -> analyze -> sample validity -> synthesize -> ``report.html``.
The stages are the ones `pathanat reproduce` runs for every model of the paper's grid; a step
found finished in the demo folder is reused, not redone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pathanat.data.phantom import generate_cohort
from pathanat.data.prepare import load_cache, prepare_cohort
from pathanat.defaults import DEMO_SUBJECTS, SEED
from pathanat.errors import PathanatError
from pathanat.evaluation.counterfactual import summary_lines
from pathanat.experiment import ExperimentConfig, load_experiment
from pathanat.figures import save_figure, slice_montage
from pathanat.metrics import estimate_text
from pathanat.reproduce import Budget, run_stages, train_stage

DEMO_BUDGET = Budget(
    about="the demo: one NVMP, 30 subjects, IW NLL with S=8, FID and KID of 512 prior draws "
          "(2048 would add about 2.5 min of Inception features, estimated from one cpu-budget "
          "run), 64 samples for validity, segmenters trained for 250 steps",
    subjects=30, overrides=(), iw_samples=8, fid=True, validity_samples=64, segmenter_steps=250,
    fid_samples=512,
)


def demo_config(cache: Path) -> ExperimentConfig:
    """The packaged `demo` experiment on ``cache`` (configs/demo.yaml: an NVMP small enough to
    train for a few minutes on 2 CPU cores; faster lr and shorter KL cycle than the paper's)."""
    return load_experiment("demo", [f"data.cache={cache}", "data.phantom=null"])


def run_demo(
    out: Path, n_subjects: int = DEMO_SUBJECTS, seed: int = SEED, overwrite: bool = False
) -> Path:
    """Run the demo into folder ``out``; returns the report's path."""
    out = Path(out).absolute()
    cohort, cache, run = out / "cohort", out / "cache", out / "run"
    if overwrite or not cohort.exists():
        print(f"[1/5] generating a {n_subjects}-subject MS phantom cohort (seed {seed})")
        generate_cohort("ms", n_subjects, cohort, seed=seed, overwrite=overwrite)
    else:
        _check_reusable(cohort, n_subjects, seed)
        print(f"[1/5] reusing the phantom cohort in {cohort}")
    if overwrite or not cache.exists():
        print("[2/5] preparing the slice cache (RAS, 2 mm, central 24 slices, standardised)")
        prepare_cohort(cohort, cache, seed=seed, overwrite=overwrite)
    else:
        print(f"[2/5] reusing the slice cache in {cache}")
    config = demo_config(cache)
    print(f"[3/5] training the demo NVMP ({config.trainer.max_steps} steps) into {run}")
    if overwrite and run.exists():
        shutil.rmtree(run)
    outcome = train_stage(run, config)
    if outcome == "done":
        print(f"      reusing the finished run in {run}")
    save_figure(_train_montage(cache), run / "figures" / "prepared_slices.png",
                caption="Prepared training slices (central and off-centre, standardised FLAIR) "
                        "with the ground-truth lesion outlines in red.")
    print("[4/5] evaluate, analyze, sample validity, lesion detection, synthesize")
    seconds: dict = {}
    run_stages(run, DEMO_BUDGET, "ms", "      run", seconds)
    print("[5/5] writing the report")
    from pathanat.evaluation.report import write_report

    report = write_report([run], out / "report.html")
    _summarise(out, cohort, cache, run, report, config.trainer.max_steps)
    return report


def _check_reusable(cohort: Path, n_subjects: int, seed: int) -> None:
    made = json.loads((cohort / "phantom.json").read_text())
    if (made.get("n_subjects"), made.get("seed")) != (n_subjects, seed):
        raise PathanatError(
            f"{cohort} holds a cohort of {made.get('n_subjects')} subjects with seed "
            f"{made.get('seed')}, not {n_subjects} with seed {seed}; pass --overwrite to remake it"
        )


def _train_montage(cache_path: Path, n_subjects: int = 8, per_subject: int = 3):
    """The central and two off-centre slices of the first training subjects."""
    train = load_cache(cache_path).split("train", mmap=True)
    table = train.slices.reset_index(drop=True)
    rows, titles = [], []
    for subject in table["subject"].unique()[:n_subjects]:
        index = table.index[table["subject"] == subject].to_numpy()
        for i in index[np.linspace(0, len(index) - 1, per_subject + 2).round().astype(int)[1:-1]]:
            rows.append(i)
            titles.append(f"{subject} k={table.at[i, 'slice']}")
    lesions = None if train.lesion is None else train.lesion[rows]
    return slice_montage(train.image[rows], lesions, titles, columns=per_subject * 4)


def _summarise(
    out: Path, cohort: Path, cache_path: Path, run: Path, report: Path, steps: int
) -> None:
    cache = load_cache(cache_path)
    counts = cache.subjects["split"].value_counts()
    slices = {s: len(cache.split(s, mmap=True)) for s in ("train", "val", "test")}
    metrics = json.loads((run / "metrics.json").read_text())
    analysis = json.loads((run / "analysis.json").read_text())
    validity = json.loads((run / "validity.json").read_text())
    detection = json.loads((run / "counterfactual.json").read_text())
    print()
    print(f"cohort   {cohort}  (NIfTI volumes, lesion masks, participants.tsv)")
    print(
        f"cache    {cache_path}  ({cache.shape[0]} x {cache.shape[1]} slices; "
        + ", ".join(f"{s}: {counts.get(s, 0)} subjects / {slices[s]} slices" for s in slices)
        + ")"
    )
    print(f"run      {run}  (config, checkpoints, metrics, analysis, figures)")
    _print_test(metrics)
    plausible = metrics.get("plausibility")
    _print_fid(metrics, plausible)
    if plausible:
        _print_samples(plausible)
    posthoc = (analysis.get("sensitivity") or {}).get("z_p_posthoc")
    print(f"latents  post-hoc z_P (pathology sensitivity): {posthoc}")
    print(f"validity invalid lesion voxels: prior samples {_counted(validity)}, real test "
          f"slices {_fraction(validity['real'])}"
          + (f", their reconstructions {_fraction(validity['reconstructions'])}"
             if validity.get("reconstructions") else ""))
    if validity.get("second_stage"):
        print(f"         second-stage prior samples {_counted(validity['second_stage'])}")
    _print_lesions(detection)
    print(f"report   {report}")
    print()
    print(f"A {steps}-step model on {counts.get('train', 0)} training subjects: look at the "
          "report; `pathanat reproduce --dataset ms` trains and compares the paper's grid.")


def _print_test(metrics: dict) -> None:
    nll, recon = metrics["nll"], metrics["reconstruction"]
    print(f"test     NLL {estimate_text(nll['bits_per_dim'], 3)} bits/dim of the binned "
          f"slices (S={nll['iw_samples']}), PSNR {estimate_text(recon['psnr'], 3)} dB, "
          f"SSIM {estimate_text(recon['ssim'], 3)} (95% CIs over subjects)")
    moved = nll.get("convergence")
    if moved:
        verdict = "converged" if moved["converged"] else "NOT converged: raise --iw-samples"
        print(f"         IW bound from S={moved['iw_samples']} to {moved['iw_samples_4x']} on "
              f"{moved['slices']} slices: {moved['move']:.1f} nats/slice lower (half-interval "
              f"{moved['ci_half_width']:.1f}): {verdict}")


def _print_fid(metrics: dict, plausible: dict | None) -> None:
    fid = metrics.get("fid") or {}
    if not fid:
        return
    floor = fid.get("floor") or {}
    print(f"FID      reconstructions {fid['fid_reconstruction']:.1f}, prior samples "
          f"{fid['fid_samples']:.1f} (vs the {fid.get('inputs', '?')} test inputs; "
          f"{fid['samples']} prior draws; KID "
          f"{estimate_text(fid.get('kid_reconstruction'), 3)} and "
          f"{estimate_text(fid.get('kid_samples'), 3)})")
    if fid.get("fid_samples_second_stage") is not None:
        staged = (plausible or {}).get("second_stage") or {}
        print(f"         second-stage prior (fitted to the training residuals): "
              f"FID {fid['fid_samples_second_stage']:.1f}, KID "
              f"{estimate_text(fid.get('kid_samples_second_stage'), 3)}"
              + (f", brain-like {estimate_text(staged['brain_like'], 2)}, shape diversity "
                 f"{staged['shape_diversity']:.3f}" if staged else ""))
    copies = (metrics.get("novelty") or {}).get("second_stage")
    if copies:
        print(f"         copy test of the second stage's draws: nearest-training distance "
              f"{copies['distance_ratio']:.2f}x the test slices' (1: new, 0: copies), "
              f"{copies['near_copies']:.1%} near copies (5% for new slices)")
    if floor:
        print(f"         floor, real {floor['split']} slices vs the test inputs: FID "
              f"{floor['fid']:.1f}, KID {estimate_text(floor['kid'], 3)}")


def _print_samples(plausible: dict) -> None:
    drawn = ", ".join(f"T={t} {estimate_text(e['brain_like'], 2)}"
                      for t, e in plausible["samples"].items())
    print(f"samples  brain-like: {drawn} (n = {next(iter(plausible['samples'].values()))['n']} "
          f"each); real test slices {estimate_text(plausible['real']['brain_like'], 2)}")
    hottest = plausible["samples"][max(plausible["samples"], key=float)]
    if hottest.get("shape_diversity") is not None:
        print(f"         shape diversity (mean pairwise 1 - Dice of outlines): samples "
              f"{hottest['shape_diversity']:.3f} at the highest T, real test slices "
              f"{plausible['real']['shape_diversity']:.3f}")


def _print_lesions(detection: dict) -> None:
    groups = ", ".join(f"z{g}" for g in detection["pathology_groups"])
    print(f"lesions  detection on test slices (AUPRC, threshold-free; Dice at the val-chosen "
          f"threshold), pathology groups {groups}:")
    if detection.get("not_scored"):
        print(f"         not scored: {detection['not_scored']}")
    for name, row in detection["detection"].items():
        print(f"         {name}: AUPRC {estimate_text(row['auprc'], 3)}, "
              f"Dice {estimate_text(row['dice'], 3)}")
    for i, line in enumerate(summary_lines(detection)):
        print(f"{'edits' if i == 0 else '':9s}{line.strip()}")


def _counted(drawn: dict) -> str:
    """The invalid fraction of a set of draws, and over how many brain-like ones it is."""
    samples, shape = drawn["samples"], drawn.get("brain_like")
    over = "" if not shape else f" (over the {samples['n']} brain-like of {shape['n']})"
    return _fraction(samples) + over


def _fraction(rates: dict) -> str:
    value = rates.get("invalid_fraction")
    return "n/a (no lesion voxels)" if value is None else f"{value:.3f}"
