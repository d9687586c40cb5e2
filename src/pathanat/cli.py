"""The one `pathanat` command. Each sub-command is a pair: a function that adds its parser and
arguments, and the handler beside it that calls the library.

An option the user leaves out is left out of the call, so the library's default stands; the help
quotes those defaults from `pathanat.defaults`, which imports nothing, and every handler imports
its stage when it runs, so `pathanat --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pathanat import __version__, defaults
from pathanat.errors import PathanatError

SPLITS = ("train", "val", "test")
RUN_HELP = "run folder made by `pathanat train`"
RUNS_HELP = "run folders made by `pathanat train`"
PATHOLOGY_GROUPS_HELP = ("latent groups that hold pathology (default: the supervised z_P, else "
                         "the post-hoc z_P of `pathanat analyze`)")


def _add(
    sub: argparse._SubParsersAction, name: str, help: str, example: str
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help.replace("%", "%%"),  # argparse %-formats this help (not the description)
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _shown(value: object) -> str:
    """A default as the command line writes it: 2.0 -> 2, (0.6, 0.8) -> 0.6 0.8."""
    if isinstance(value, (tuple, list)):
        return " ".join(map(_shown, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The options among ``names`` given on the command line, as keyword arguments; the others
    stay out of the call, so the library's defaults stand."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _seed(p: argparse.ArgumentParser, what: str = "seed") -> None:
    p.add_argument("--seed", type=int, help=f"{what} (default {defaults.SEED})")


# ---- data -------------------------------------------------------------------------------------


def _phantom_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "phantom",
        "Generate a synthetic MS or AD cohort of NIfTI volumes from real templates.",
        "pathanat phantom --kind ms --subjects 100 --out cohorts/ms --seed 0",
    )
    p.add_argument(
        "--kind",
        choices=["ms", "ad"],
        required=True,
        help="ms: FLAIR with lesions; ad: T1 with atrophy",
    )
    p.add_argument("--subjects", type=int, required=True, help="number of subjects")
    p.add_argument("--out", type=Path, required=True, help="output cohort folder")
    _seed(p, "cohort seed")
    p.add_argument(
        "--slab-mm",
        type=float,
        help="generate only an axial slab this thick around the brain centre "
        f"(default {_shown(defaults.SLAB_MM)})",
    )
    p.add_argument("--full", action="store_true", help="generate whole volumes instead of a slab")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_phantom)
    return p


def _phantom(args: argparse.Namespace) -> None:
    from pathanat.data.phantom import generate_cohort

    slab = {"slab_mm": None} if args.full else _given(args, "slab_mm")
    out = generate_cohort(
        kind=args.kind,
        n_subjects=args.subjects,
        out_dir=args.out,
        overwrite=args.overwrite,
        progress=not args.quiet,
        **slab,
        **_given(args, "seed"),
    )
    print(f"phantom cohort written to {out}")


def _prepare_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "prepare",
        "Turn a cohort of NIfTI volumes into a standardised, split slice cache.",
        "pathanat prepare --cohort bids/ --out caches/ms --suffix FLAIR --derivatives lesions "
        "--register affine",
    )
    p.add_argument(
        "--cohort",
        type=Path,
        required=True,
        help="BIDS folder (sub-*/[ses-*/]anat/*.nii.gz, participants.tsv, derivatives/) or a CSV "
        "manifest (README, Data formats)",
    )
    p.add_argument("--out", type=Path, required=True, help="output cache folder")
    p.add_argument("--in-plane-mm", type=float,
                   help=f"in-plane voxel size (default {_shown(defaults.IN_PLANE_MM)})")
    p.add_argument("--slice-mm", type=float,
                   help=f"slice spacing (default {_shown(defaults.SLICE_MM)})")
    per_suffix = ", ".join(f"{n} for {suffix}" for suffix, n in defaults.DEFAULT_SLICES.items())
    p.add_argument("--slices", type=int, dest="n_slices", metavar="SLICES",
                   help=f"central axial slices kept per subject (default {per_suffix})")
    p.add_argument("--shape", type=int, nargs=2, metavar=("NX", "NY"),
                   help=f"in-plane slice shape, multiples of 16 (default {_shown(defaults.SHAPE)})")
    _seed(p, "seed of the subject-level split")
    p.add_argument(
        "--suffix",
        "--modality",
        dest="modality",
        metavar="SUFFIX",
        help="the image contrast to use, as its BIDS suffix (FLAIR, T2w, T1w, ...), when the "
        "cohort holds several",
    )
    _prepare_source_arguments(p)
    p.add_argument("--workers", type=int, help=f"parallel processes (default {defaults.WORKERS})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)
    return p


def _prepare_source_arguments(p: argparse.ArgumentParser) -> None:
    """Which image and masks of a subject are used, and how the head is aligned."""
    p.add_argument(
        "--derivatives",
        nargs="+",
        metavar="NAME",
        help="pipelines under derivatives/ that masks come from, in order of preference "
        "(default: any; a mask found in two is an error)",
    )
    p.add_argument(
        "--entity",
        action="append",
        default=[],
        metavar="KEY=LABEL",
        help="an entity the image must have, e.g. acq=3d (repeatable); of several runs left, "
        "the highest is used",
    )
    p.add_argument(
        "--register",
        choices=["none", "rigid", "affine"],
        help="align each head to the MNI152 template before slicing (default "
        f"{defaults.REGISTER}: the volumes are taken as aligned)",
    )


def _prepare(args: argparse.Namespace) -> None:
    import warnings

    from pathanat.data.prepare import prepare_cohort

    options = _given(args, "in_plane_mm", "slice_mm", "n_slices", "seed", "modality", "workers",
                     "derivatives", "register")
    if args.shape is not None:
        options["shape"] = tuple(args.shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        out = prepare_cohort(
            cohort=args.cohort,
            out=args.out,
            overwrite=args.overwrite,
            progress=not args.quiet,
            entities=_entities(args.entity),
            **options,
        )
    for w in caught:  # one line each, after the progress bar
        if issubclass(w.category, UserWarning):
            print(f"pathanat prepare: warning: {w.message}", file=sys.stderr)
    print(f"slice cache written to {out}")


def _entities(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise PathanatError(f"--entity expects KEY=LABEL such as acq=3d; got {pair!r}")
        out[key.strip()] = value.strip()
    return out


# ---- training ---------------------------------------------------------------------------------


def _train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "train",
        "Train a hierarchical VAE from a YAML config (any key overridable), or resume a run.",
        "pathanat train configs/nvmp_ms.yaml trainer.max_steps=200 --out runs/nvmp_ms",
    )
    p.add_argument(
        "config",
        nargs="?",
        type=Path,
        help="experiment YAML, or the name of a packaged one (nvmp_ms, vae_ms_sup, ...; configs/)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="KEY=VALUE overrides, e.g. model.kind=nvmp trainer.max_steps=200",
    )
    p.add_argument("--out", type=Path, help="run folder (default runs/<config name>)")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue RUN from its last checkpoint (only trainer.* keys may be overridden)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=_train)
    return p


def _train(args: argparse.Namespace) -> None:
    from pathanat.training.run import resume, train

    if args.resume is not None:
        # with --resume every positional item is an override (the run carries its config)
        overrides = ([str(args.config)] if args.config else []) + args.overrides
        run = resume(args.resume, overrides)
    elif args.config is None:
        raise PathanatError("train: expected a CONFIG file, or --resume RUN")
    else:
        run = train(args.config, args.overrides, out=args.out, overwrite=args.overwrite)
    print(f"run folder: {run} (config.yaml, checkpoints/, metrics.csv, tensorboard/, figures/)")


# ---- evaluation stages ------------------------------------------------------------------------


def _evaluate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "evaluate",
        "Measure a trained run on a split of its cache: importance-weighted NLL (nats/slice and "
        "bits/dim, S stated), PSNR/SSIM of posterior-mean reconstructions (whole slice and brain "
        "mask), FID and KID of reconstructions, of prior samples and of draws of the second-"
        "stage prior (a mixture fitted to the training residuals) vs inputs, brain-like "
        "fractions of samples, each with a confidence interval. Writes RUN/metrics.json, "
        "RUN/eval/SPLIT_slices.csv and a row of RUN/metrics_eval.csv.",
        "pathanat evaluate runs/nvmp_ms --iw-samples 100",
    )
    p.add_argument("run", type=Path, help=RUN_HELP)
    p.add_argument("--split", choices=SPLITS, help=f"split measured (default {defaults.SPLIT})")
    p.add_argument("--iw-samples", type=int,
                   help=f"S of the IW bound (default {defaults.DEFAULT_IW_SAMPLES})")
    _seed(p, "seed of every random draw")
    p.add_argument("--batch-size", type=int,
                   help=f"slices per batch (default {defaults.DEFAULT_BATCH_SIZE})")
    p.add_argument("--no-fid", action="store_true", help="skip FID (the slowest part)")
    p.add_argument("--fid-samples", type=int, metavar="N",
                   help="draws of the prior, and of the second stage, for the FID/KID of "
                        f"samples (default {defaults.FID_SAMPLES}, or the split's slice count if "
                        "larger)")
    p.set_defaults(func=_evaluate)
    return p


def _evaluate(args: argparse.Namespace) -> None:
    from pathanat.evaluation.evaluate import evaluate_run

    metrics = evaluate_run(
        args.run,
        with_fid=not args.no_fid,
        progress=True,
        **_given(args, "split", "iw_samples", "seed", "batch_size", "fid_samples"),
    )
    print("\n".join(_summary(metrics)))
    print(f"written: {args.run / 'metrics.json'}, {args.run / 'metrics_eval.csv'}")


def _analyze_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "analyze",
        "Which latent group holds pathology: Lasso R2 per group against lesion volume / atrophy "
        "severity (paper Table 4, subject and slice level), R2 for every cohort factor, DCI, and "
        "pathology sensitivity per group (Fig. 6c; the highest ratio is the post-hoc z_P). Writes "
        "RUN/analysis.json, RUN/analysis/*.csv and the figures latent_r2.png and "
        "pathology_sensitivity.png in RUN/figures.",
        "pathanat analyze runs/nvmp_ms",
    )
    p.add_argument("run", type=Path, help=RUN_HELP)
    p.add_argument("--split", choices=SPLITS,
                   help=f"split the regressors are scored on (default {defaults.SPLIT})")
    p.add_argument("--train-split", choices=SPLITS,
                   help=f"split the regressors are fitted on (default {defaults.TRAIN_SPLIT})")
    p.add_argument("--factors", type=float, nargs="+",
                   help="latent scale factors of the sensitivity analysis "
                        f"(default {_shown(defaults.SENSITIVITY_FACTORS)})")
    p.add_argument("--examples", type=int,
                   help="test slices (largest lesions) in the sensitivity analysis "
                        f"(default {defaults.SENSITIVITY_EXAMPLES})")
    p.add_argument("--batch-size", type=int,
                   help=f"slices per batch (default {defaults.DEFAULT_BATCH_SIZE})")
    _seed(p)
    p.set_defaults(func=_analyze)
    return p


def _analyze(args: argparse.Namespace) -> None:
    from pathanat.evaluation.analyze import analyze_run

    summary = analyze_run(
        args.run,
        **_given(args, "split", "train_split", "factors", "examples", "batch_size", "seed"),
    )
    print("\n".join(_summary(summary)))
    print(
        f"written: {args.run / 'analysis.json'}, {args.run / 'analysis'}/, {args.run / 'figures'}/"
    )


def _summary(result: dict, prefix: str = "") -> list[str]:
    """One line per number of a nested result: estimates as ``mean [ci_low, ci_high]``."""
    from pathanat.metrics import estimate_text  # keeps `pathanat --help` light

    lines = []
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and {"mean", "ci_low", "ci_high"} <= value.keys():
            lines.append(f"{name}: {estimate_text(value)}")
        elif isinstance(value, dict):
            lines += _summary(value, f"{name}.")
        elif isinstance(value, float):
            lines.append(f"{name}: {value:.4g}")
        elif isinstance(value, (int, str)) and len(str(value)) <= 60:
            lines.append(f"{name}: {value}")
    return lines


def _synthesize_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "synthesize",
        "Draw what a trained run generates: prior samples at temperatures (prior), per-layer "
        "variation (layers, Fig. 6a), pathology of one slice on another's anatomy (style-mix, "
        "Fig. 4), pathology resampled on fixed anatomy and fixed pathology on other anatomy "
        "(conditional, Fig. 3), VampPrior components and their test slices (clusters, Fig. 6b). "
        "Writes RUN/figures/synth_WHAT.png with a caption beside each, and RUN/synthesis.json.",
        "pathanat synthesize runs/nvmp_ms --what style-mix conditional --pathology-groups 2",
    )
    p.add_argument("run", type=Path, help=RUN_HELP)
    p.add_argument("--what", nargs="+",
                   choices=["prior", "layers", "style-mix", "conditional", "clusters"],
                   help="figures to draw (default: all the run's kind supports)")
    p.add_argument("--pathology-groups", nargs="+", type=int, metavar="L",
                   help=PATHOLOGY_GROUPS_HELP)
    p.add_argument("--split", choices=SPLITS, help=f"split drawn from (default {defaults.SPLIT})")
    _seed(p, "seed of every draw")
    p.add_argument("--temperatures", nargs="+", type=float,
                   help=f"rows of the prior figure (default {_shown(defaults.TEMPERATURES)})")
    p.add_argument("--temperature", type=float,
                   help="of the prior draws in layers and conditional "
                        f"(default {_shown(defaults.TEMPERATURE)})")
    p.add_argument("--samples", type=int,
                   help=f"prior samples per row (default {defaults.PRIOR_SAMPLES})")
    p.add_argument("--draws", type=int,
                   help=f"draws per row of layers and conditional (default {defaults.DRAWS})")
    p.add_argument("--pairs", type=int,
                   help=f"style-mix pairs (default {defaults.STYLE_MIX_PAIRS})")
    p.add_argument("--per-cluster", type=int,
                   help="test slices shown per VampPrior component "
                        f"(default {defaults.PER_CLUSTER})")
    p.set_defaults(func=_synthesize)
    return p


def _synthesize(args: argparse.Namespace) -> None:
    from pathanat.evaluation.synthesis import synthesize_run

    summary = synthesize_run(
        args.run,
        **_given(args, "what", "pathology_groups", "split", "seed", "temperatures", "temperature",
                 "samples", "draws", "pairs", "per_cluster"),
    )
    groups = summary["pathology_groups"]
    if groups is not None:
        print(f"pathology groups: {groups} ({summary['pathology_source']})")
    for what, figure in summary["figures"].items():
        print(f"{what}: {args.run / figure}")


def _validity_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "validity",
        "Sample validity (MS): the fraction of lesion-like voxels of prior samples that fall in "
        "background, CSF or ventricles, by a lesion and a tissue segmenter trained once per cache "
        "on its ground truth (their test accuracy reported beside), with real test slices as the "
        "reference rate. Writes RUN/validity.json and RUN/figures/sample_validity.png.",
        "pathanat validity runs/vae_ms runs/nvmp_ms --samples 1024",
    )
    p.add_argument("run", type=Path, nargs="+", help=RUNS_HELP)
    p.add_argument("--samples", type=int, dest="n", metavar="SAMPLES",
                   help=f"prior samples (default {defaults.VALIDITY_SAMPLES})")
    p.add_argument("--temperature", type=float,
                   help=f"sampling temperature (default {_shown(defaults.TEMPERATURE)})")
    _seed(p)
    p.set_defaults(func=_validity)
    return p


def _validity(args: argparse.Namespace) -> None:
    from pathanat.evaluation.validity import validity_run

    for run in args.run:
        result = validity_run(run, **_given(args, "n", "temperature", "seed"))
        rates = {k: result[k]["invalid_fraction"] for k in ("samples", "real", "truth")}
        shown = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in rates.items())
        print(f"{run}: invalid fraction of lesion voxels: {shown}")
        print(f"written: {run / 'validity.json'}, {run / 'figures' / 'sample_validity.png'}")


def _counterfactual_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "counterfactual",
        "Pathology edits of an MS run scored against the phantom's truth (95% subject-bootstrap "
        "CIs throughout). The swap P(a) + A(b) over test pairs: effectiveness (the lesion "
        "segmenter's area on the mix against a's true area; Dice where b's tissue allows), "
        "anatomy kept (tissue Dice against b's labels; factor R^2 from the mix's z_A), "
        "reversibility (P(b) + A(mix) against b's reconstruction), minimality (change outside "
        "the lesions over change inside); composition (the null edit repeated 1 and 10 times); "
        "conditional redraws of z_P (lesion-area spread, lesions in valid tissue, anatomy "
        "Dice); and pseudo-healthy lesion detection -- the pathology groups set to their prior "
        "mean given the groups above, the positive residual in the brain as a lesion score -- "
        "with pixel AUPRC, Dice at a threshold chosen on the val split, best Dice (optimistic) "
        "and lesion-load correlation, beside the plain reconstruction's residual and the "
        "intensity. Writes RUN/counterfactual.json, RUN/figures/counterfactual_swap.png and "
        "lesion_detection.png.",
        "pathanat counterfactual runs/nvmp_ms_sup",
    )
    p.add_argument("run", type=Path, nargs="+", help=RUNS_HELP)
    p.add_argument("--pathology-groups", nargs="+", type=int, metavar="L",
                   help=PATHOLOGY_GROUPS_HELP)
    p.add_argument("--pairs", type=int,
                   help=f"test pairs swapped (default {defaults.COUNTERFACTUAL_PAIRS})")
    _seed(p, "seed of the pairs, the draws and the bootstrap")
    p.set_defaults(func=_counterfactual)
    return p


def _counterfactual(args: argparse.Namespace) -> None:
    from pathanat.evaluation.counterfactual import (
        COUNTERFACTUAL_JSON,
        FIGURE,
        SWAP_FIGURE,
        counterfactual_run,
        summary_lines,
    )
    from pathanat.metrics import estimate_text

    for run in args.run:
        result = counterfactual_run(run, **_given(args, "pathology_groups", "seed", "pairs"))
        groups = ", ".join(f"z{g}" for g in result["pathology_groups"])
        print(f"{run}: lesion detection on the test split (pathology groups {groups}, "
              f"{result['pathology_source']}; threshold chosen on val)")
        if result["not_scored"]:
            print(f"  not scored: {result['not_scored']}")
        for name, row in result["detection"].items():
            print(f"  {name:24s} AUPRC {estimate_text(row['auprc'], 3)}, "
                  f"Dice {estimate_text(row['dice'], 3)}, "
                  f"best Dice {estimate_text(row['best_dice'], 3)} (optimistic), "
                  f"load r {estimate_text(row['load_correlation'], 3)}")
        for line in summary_lines(result):
            print(f"  {line}")
        print(f"written: {run / COUNTERFACTUAL_JSON}, {run / SWAP_FIGURE}, {run / FIGURE}")


def _report_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "report",
        "One self-contained HTML page over one or more runs: runs overview, Table 1-style metrics "
        "with 95% CIs, Table 4 R2 grids, pathology sensitivity, DCI, sample validity, training "
        "curves and every figure with its caption; what a run lacks names the command to run.",
        "pathanat report runs/vae_ms runs/nvmp_ms --out runs/report.html",
    )
    p.add_argument("run", type=Path, nargs="+", help=RUNS_HELP)
    p.add_argument("--out", type=Path,
                   help="HTML file (default RUN/report.html for one run, else report.html in "
                        "the runs' common folder)")
    p.add_argument("--title", help="page title (default: the run names)")
    p.set_defaults(func=_report)
    return p


def _report(args: argparse.Namespace) -> None:
    from pathanat.evaluation.report import default_report_path, write_report

    out = write_report(args.run, args.out or default_report_path(args.run), title=args.title)
    print(f"report written to {out}")


# ---- the whole pipeline -----------------------------------------------------------------------


def _reproduce_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "reproduce",
        "Run the paper's grid on the phantom cohort: the four kinds (and, for ms, their z_P-"
        "supervised variants) under one budget, then evaluate, analyze, sample validity and "
        "lesion detection (ms), synthesize, one report over all runs, and the paper's claims "
        "checked. Resumable: a finished run or stage is not redone. Budgets: cpu (200 subjects; "
        "about 2 h on 2 CPU cores for ms, its runs' stages measured alone at 13-17 min a run), "
        "paper (the paper's settings, for a GPU), smoke (minutes; checks the pipeline only).",
        "pathanat reproduce --dataset ms --budget cpu --out reproduce-ms",
    )
    p.add_argument("--dataset", choices=["ms", "ad"], required=True)
    p.add_argument("--budget", choices=["cpu", "paper", "smoke"],
                   help=f"compute per run (default {defaults.BUDGET})")
    p.add_argument("--out", type=Path, help="grid folder (default reproduce-DATASET-BUDGET)")
    p.add_argument("--cache", type=Path,
                   help="a prepared slice cache to use instead of the phantom (e.g. real data)")
    p.add_argument("--runs", nargs="+", metavar="NAME",
                   help="only these runs of the grid (config names, e.g. vae_ms nvmpplus_ms)")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="train every run with seeds 0..N-1 (seed s > 0 in OUT/NAME_seedS); the "
                        "report gives each number's spread over seeds and the claims are decided "
                        f"by unanimity over them (default {defaults.SEEDS})")
    p.add_argument("--detail-steps", type=int, metavar="N",
                   help="give every run's second stage a drawn detail model fitted for N steps "
                        "(second_stage.detail_steps; 0 removes it); trained runs keep their "
                        "model and redo evaluate, validity and synthesize. 8000 lowered the FID "
                        "of second-stage draws by 8-14%% on the cpu budget and took about 30-35 "
                        "min more a run on 2 CPU cores; 16000 lowered it 7-12%% more (seed 0, two "
                        "runs) and took about 50 min more a run (docs/generation.md, seventeenth "
                        "and eighteenth rounds). Default: each run's own setting (none in the "
                        "packaged configs)")
    p.set_defaults(func=_reproduce)
    return p


def _reproduce(args: argparse.Namespace) -> None:
    from pathanat.reproduce import reproduce

    reproduce(args.dataset, **_given(args, "budget", "out", "cache", "runs", "seeds",
                                          "detail_steps"))


def _demo_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = _add(
        sub,
        "demo",
        "Run the main job end to end on a small embedded phantom MS cohort.",
        "pathanat demo --out pathanat-demo",
    )
    p.add_argument(
        "--out", type=Path, default=Path("pathanat-demo"), help="run folder (default pathanat-demo)"
    )
    p.add_argument("--subjects", type=int, dest="n_subjects", metavar="SUBJECTS",
                   help=f"phantom subjects (default {defaults.DEMO_SUBJECTS})")
    _seed(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    p.set_defaults(func=_demo)
    return p


def _demo(args: argparse.Namespace) -> None:
    from pathanat.demo import run_demo

    run_demo(out=args.out, overwrite=args.overwrite, **_given(args, "n_subjects", "seed"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathanat",
        description="Pathology-anatomy disentanglement in brain MRI with structured HVAE priors.",
        epilog="example:\n  pathanat demo --out pathanat-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pathanat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (
        _phantom_parser, _prepare_parser, _train_parser, _evaluate_parser, _analyze_parser,
        _synthesize_parser, _validity_parser, _counterfactual_parser, _report_parser,
        _reproduce_parser, _demo_parser,
    ):
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PathanatError as err:
        print(f"pathanat {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"pathanat {args.command}: interrupted; nothing half-written was kept", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
