"""`pathanat reproduce`: the paper's grid on the phantom cohort, end to end, resumable.

For ``--dataset ms`` the grid is the four kinds (vae, nvae, nvmp, nvmp+) and their four
z_P-supervised variants; for ``ad`` the four kinds. Every run uses its packaged config
(``configs/<kind>_<dataset>[_sup].yaml``) with the budget's overrides, one shared phantom cohort
and cache, and then goes through the same stages:

    train -> evaluate -> analyze -> validity (ms) -> synthesize,   and one report over all runs.

Resumable: a finished run is not trained again (an interrupted one is resumed from its last
checkpoint), and a stage whose output is newer than the run's last checkpoint is not redone. A run
folder that holds a different model than the grid asks for stops the command rather than being
mixed in. ``OUT/reproduce.json`` records the budget, the runs, each stage's seconds and the claims.

``seeds=N`` trains every run of the grid with training seeds 0..N-1: seed 0 in ``OUT/<name>``
(so a one-seed grid grows into more without retraining), seed s in ``OUT/<name>_seed<s>``. The
report's tables show seed 0 and a section gives each number's mean and spread over seeds; the
claims are decided over seeds (``evaluation.claims``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pathanat.config import save_config, to_dict
from pathanat.data.prepare import load_cache
from pathanat.defaults import BUDGET, SEEDS
from pathanat.errors import PathanatError, checked_int
from pathanat.experiment import ExperimentConfig, load_experiment
from pathanat.hardware import native_bf16
from pathanat.jsonfiles import read_json, write_json
from pathanat.models.config import KIND_NAMES
from pathanat.runs import LAST, is_current
from pathanat.training.run import resume, train_config

KINDS = tuple(KIND_NAMES.values())  # as config names spell them (nvmp+ is "nvmpplus")
DATASETS = ("ms", "ad")


@dataclass(frozen=True)
class Budget:
    """How much compute each run of the grid gets; ``overrides`` apply to every packaged config."""

    about: str
    subjects: int
    overrides: tuple[str, ...]
    iw_samples: int
    fid: bool
    validity_samples: int
    # training steps of the cohort's segmenters (validity) when a cache has none yet; None: the
    # segmenters' default (segmenters.STEPS)
    segmenter_steps: int | None = None
    # prior draws for the FID/KID of samples; None: evaluate's default (FID_SAMPLES)
    fid_samples: int | None = None


# 200 subjects: the 60/20/20 split leaves 40 test subjects, enough for per-subject numbers (Table
# 4's subject-level R², subject-bootstrap intervals); the phantom and the cache are cheap and a
# run's training cost does not grow with the cohort
GRID_SUBJECTS = 200

_SMALL_FAST = (  # what lets a model learn, and generate, in minutes on a CPU (as the demo);
    # vae and nvae with a fitted N(m, s^2) where the paper has N(0, I), which draws no brains, and
    # the conditional priors recentred on the posteriors, whose learned form draws blurred boxes
    "model.width=16", "model.widths=[64,64,32,16,16]", "model.cells=[2,2,1,1,0]",
    "model.unconditional_prior=fitted", "model.conditional_prior=recentred",
    "optim.lr=1e-3", "optim.warmup_steps=100", "optim.lr_decay=cosine", "optim.grad_clip=100",
    "data.num_workers=0", "trainer.val_batches=4",
)


def cpu_precision() -> str:
    """bf16-mixed where the CPU has bf16 arithmetic (~2x fp32 there), else fp32."""
    return "bf16-mixed" if native_bf16() else "32"


BUDGETS = {
    "cpu": Budget(
        about="about 2 h on 2 CPU cores for the 8 MS runs (their stages measured alone on an "
              "AMD EPYC with bf16 arithmetic: 13-17 min a run, of which training 3.5-7 min, "
              "evaluate 5-6 min, analyze 2-4.5 min, validity, lesion detection and synthesis "
              "1-2 min): 200 subjects, widths 64..16, "
              "1200 steps (KL weight reaches 1 at step 800), cosine lr, vae and nvae with fitted "
              "unconditional priors (the paper's N(0, I) draws no brains), recentred conditional "
              "priors (the learned ones draw blurred boxes), bf16 where the CPU has it, IW NLL "
              "with S=8, FID and KID of 1024 draws of the model's prior and 1024 of the "
              "second-stage prior",
        subjects=GRID_SUBJECTS,
        overrides=(*_SMALL_FAST, f"trainer.precision={cpu_precision()}",
                   # the 600-step schedule stretched twice: the FIDs of reconstructions and of
                   # draws both fell; an 800-step cycle (a second rise) scored worse ones on
                   # both (docs/generation.md, tenth round)
                   "objective.kl_cycle=1600", "trainer.max_steps=1200",
                   "trainer.log_every=25", "trainer.val_every=300",
                   "trainer.checkpoint_every=300"),
        iw_samples=8, fid=True, validity_samples=256, fid_samples=1024,
    ),
    "paper": Budget(
        about="the paper's settings for a GPU: 200 subjects, width 32, 2 cells per scale, "
              "100 000 steps, IW NLL with S=32",
        subjects=GRID_SUBJECTS, overrides=(), iw_samples=32, fid=True, validity_samples=1024,
    ),
    "smoke": Budget(
        about="a few minutes: checks that every stage runs; the numbers mean nothing",
        subjects=12,
        overrides=(*_SMALL_FAST, "model.widths=[16,16,8,8,8]", "model.cells=[1,1,1,1,1]",
                   "data.batch_size=8", "objective.kl_cycle=20", "optim.warmup_steps=2",
                   "trainer.max_steps=10", "trainer.log_every=5", "trainer.val_every=10",
                   "trainer.checkpoint_every=10", "trainer.val_batches=1",
                   "trainer.progress_bar=false"),
        iw_samples=2, fid=False, validity_samples=16,
    ),
}


def grid(dataset: str) -> list[str]:
    """The packaged config names of the dataset's grid, in the paper's order."""
    if dataset not in DATASETS:
        raise PathanatError(f"--dataset: expected one of {', '.join(DATASETS)}, got {dataset!r}")
    names = [f"{kind}_{dataset}" for kind in KINDS]
    if dataset == "ms":
        names += [f"{kind}_ms_sup" for kind in KINDS]
    return names


def budget_named(name: str) -> Budget:
    if name not in BUDGETS:
        raise PathanatError(f"--budget: expected one of {', '.join(BUDGETS)}, got {name!r}")
    return BUDGETS[name]


def seed_folder(name: str, seed: int) -> str:
    """The run folder of grid run ``name`` trained with ``seed``."""
    return name if seed == 0 else f"{name}_seed{seed}"


def run_config(name: str, budget: Budget, out: Path, cache: Path | None,
               seed: int = 0, detail_steps: int | None = None) -> ExperimentConfig:
    """The packaged config ``name`` under the budget with training seed ``seed``, on ``cache`` or
    on the budget's phantom; ``detail_steps``: the second stage's, where not the config's."""
    overrides = [*budget.overrides, f"trainer.seed={seed}"]
    if detail_steps is not None:
        overrides.append(f"second_stage.detail_steps={detail_steps}")
    if cache is None:
        overrides += [f"data.phantom.subjects={budget.subjects}", f"data.data_dir={out}"]
    else:
        shape = list(load_cache(cache).shape)
        overrides += [f"data.cache={cache}", "data.phantom=null", f"data.shape={shape}",
                      f"model.image_size={shape}"]
    return load_experiment(name, overrides)


# ---- stages ------------------------------------------------------------------------------------


def trained_steps(run: Path) -> int:
    summary = run / "summary.json"
    return read_json(summary).get("steps", 0) if summary.is_file() else 0


def check_grid_settings(run: Path, config: ExperimentConfig) -> None:
    """Stop if ``run`` holds a model other than the one the grid asks for (another budget),
    or one trained on another learning-rate schedule, which resuming would not undo."""
    saved = run / "config.yaml"
    if not saved.is_file():
        return
    held = load_experiment(saved)
    for section in ("model", "objective", "optim"):
        if to_dict(getattr(held, section)) != to_dict(getattr(config, section)):
            raise PathanatError(
                f"{run} holds a run whose {section} settings differ from this grid's (another "
                "budget?); pass another --out, or delete that run folder to train it again"
            )
    ends = [c.optim.decay_end(c.trainer.max_steps) for c in (held, config)]
    if ends[0] != ends[1]:
        raise PathanatError(
            f"{run} holds a run whose learning rate decays to 0 at step {ends[0]}, this grid's "
            f"at step {ends[1]} (another budget?); pass another --out, or delete that run "
            "folder to train it again"
        )


def train_stage(run: Path, config: ExperimentConfig) -> str:
    check_grid_settings(run, config)
    steps = config.trainer.max_steps
    if trained_steps(run) >= steps:
        return "done"
    if (run / "checkpoints" / LAST).is_file():
        resume(run, [f"trainer.max_steps={steps}"])
        return "resumed"
    train_config(config, run, overwrite=True)  # a folder without a checkpoint holds nothing
    return "trained"


# the stages that draw from the second stage: done again when a run's second stage changes
DRAWS_FROM_SECOND_STAGE = ("metrics.json", "validity.json", "synthesis.json")


def set_second_stage(run: Path, config: ExperimentConfig) -> str:
    """Give the trained ``run`` the grid's second_stage section in its config.yaml (which decides
    its second stage: ``runs.with_folder_second_stage``). Where the run had another, the outputs
    drawn from its second stage are removed, so that their stages run again."""
    path = run / "config.yaml"
    held = load_experiment(path)
    if held.second_stage == config.second_stage:
        return "done"
    for output in DRAWS_FROM_SECOND_STAGE:  # first: stopped between the two, a call redoes both
        (run / output).unlink(missing_ok=True)
    save_config(replace(held, second_stage=config.second_stage), path)
    return "changed"


@dataclass(frozen=True)
class Stage:
    name: str
    output: str
    compute: Callable[[Path, Budget], object]
    datasets: tuple[str, ...] = DATASETS


def _evaluate(run: Path, budget: Budget) -> object:
    from pathanat.evaluation.evaluate import evaluate_run

    return evaluate_run(run, iw_samples=budget.iw_samples, with_fid=budget.fid,
                        fid_samples=budget.fid_samples)


def _analyze(run: Path, budget: Budget) -> object:
    from pathanat.evaluation.analyze import analyze_run

    return analyze_run(run)


def _validity(run: Path, budget: Budget) -> object:
    from pathanat.evaluation.validity import validity_run

    return validity_run(run, n=budget.validity_samples, segmenter_steps=budget.segmenter_steps)


def _counterfactual(run: Path, budget: Budget) -> object:
    from pathanat.evaluation.counterfactual import counterfactual_run

    return counterfactual_run(run, segmenter_steps=budget.segmenter_steps)


def _synthesize(run: Path, budget: Budget) -> object:
    from pathanat.evaluation.synthesis import synthesize_run

    return synthesize_run(run)


STAGES = (
    Stage("evaluate", "metrics.json", _evaluate),
    Stage("analyze", "analysis.json", _analyze),
    Stage("validity", "validity.json", _validity, ("ms",)),
    Stage("counterfactual", "counterfactual.json", _counterfactual, ("ms",)),
    Stage("synthesize", "synthesis.json", _synthesize),
)


def run_stages(run: Path, budget: Budget, dataset: str, label: str, seconds: dict) -> None:
    """Every evaluation stage of a trained run that is not already current; seconds by stage."""
    for stage in STAGES:
        if dataset not in stage.datasets:
            continue
        if is_current(run / stage.output, run):
            print(f"{label}: {stage.name}: done")
            continue
        _timed(f"{label}: {stage.name}", seconds, stage.name,
               lambda stage=stage: stage.compute(run, budget))


# ---- the grid ----------------------------------------------------------------------------------


def reproduce(
    dataset: str,
    budget: str = BUDGET,
    out: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    runs: Sequence[str] | None = None,
    seeds: int = SEEDS,
    detail_steps: int | None = None,
) -> Path:
    """Train, evaluate, analyse, check and draw the grid of ``dataset`` into ``out`` (default
    ``reproduce-<dataset>-<budget>``) and write ``OUT/report.html``; returns ``out``.

    ``cache``: a prepared slice cache to use instead of the phantom (e.g. a real cohort).
    ``runs``: a subset of the grid's config names. ``seeds``: training seeds per run.
    ``detail_steps``: every run's drawn detail (0: none); None leaves each run's as it is
    (module docstring). Example: ``reproduce("ms", "cpu", seeds=3)``.
    """
    seeds = checked_int(seeds, "--seeds", what="training seeds per run")
    if detail_steps is not None:
        detail_steps = checked_int(detail_steps, "--detail-steps", minimum=0,
                                   what="fitting steps of the drawn detail; 0 for none")
    chosen = budget_named(budget)
    names = grid(dataset)
    if runs is not None:
        unknown = sorted(set(runs) - set(names))
        if unknown:
            raise PathanatError(f"--runs: {unknown} not in the {dataset} grid ({names})")
        names = [n for n in names if n in runs]
    out = Path(out or f"reproduce-{dataset}-{budget}").absolute()
    cache = None if cache is None else Path(cache).absolute()
    record = _record(out, dataset, budget, chosen, names, seeds, detail_steps)
    detail = "" if detail_steps is None else f", drawn detail fitted for {detail_steps} steps"
    print(f"reproduce {dataset}, budget {budget}, {seeds} seed(s){detail}: {chosen.about}")
    todo = [(seed, name) for seed in range(seeds) for name in names]  # seed by seed: a stopped
    for i, (seed, name) in enumerate(todo, 1):  # grid has whole grids of its first seeds
        folder = seed_folder(name, seed)
        run = out / folder
        config = run_config(name, chosen, out, cache, seed, detail_steps)
        seconds = record["seconds"].setdefault(folder, {})
        label = f"[{i}/{len(todo)}] {folder}"
        _timed(f"{label}: train", seconds, "train",
               lambda run=run, config=config: train_stage(run, config))
        if detail_steps is not None:
            print(f"{label}: second stage: {set_second_stage(run, config)}", flush=True)
        run_stages(run, chosen, dataset, label, seconds)
        _write_record(out, record)
    record["claims"] = claims_of(out, dataset, names, seeds)
    report = _report(out, names, seeds, record["claims"], record["seconds"])
    _write_record(out, record)
    print_claims(record["claims"])
    print(f"report   {report}")
    return out


def _record(out: Path, dataset: str, budget: str, chosen: Budget, names: list[str],
            seeds: int, detail_steps: int | None) -> dict:
    path = out / "reproduce.json"
    old = read_json(path, "delete it to start the record afresh") if path.is_file() else {}
    return {"dataset": dataset, "budget": budget, "about": chosen.about,
            "overrides": list(chosen.overrides), "runs": names, "seeds": seeds,
            "detail_steps": detail_steps if detail_steps is not None else old.get("detail_steps"),
            "folders": [seed_folder(n, s) for s in range(seeds) for n in names],
            "seconds": old.get("seconds", {})}


def _write_record(out: Path, record: dict) -> None:
    write_json(out / "reproduce.json", record)


def _timed(label: str, seconds: dict, key: str, work: Callable[[], object]) -> None:
    print(f"{label} ...", flush=True)
    started = time.monotonic()
    outcome = work()
    took = time.monotonic() - started
    if outcome != "done":
        seconds[key] = round(took, 1)
    print(f"{label}: {outcome if isinstance(outcome, str) else 'written'} ({took:.0f} s)",
          flush=True)


def _report(out: Path, names: list[str], seeds: int, claims: list[dict],
            seconds: dict) -> Path:
    from pathanat.evaluation.report import write_report

    replicates = ({n: [out / seed_folder(n, s) for s in range(seeds)] for n in names}
                  if seeds > 1 else None)
    folders = [seed_folder(n, s) for s in range(seeds) for n in names]
    return write_report([out / n for n in names], out / "report.html", claims=claims,
                        replicates=replicates,
                        seconds={f: seconds[f] for f in folders if f in seconds})


# ---- the paper's claims, checked on what the grid measured -------------------------------------


def _read(run: Path, name: str) -> dict | None:
    path = run / name
    return read_json(path) if path.is_file() else None


def claims_of(out: Path, dataset: str, names: list[str], seeds: int = 1) -> list[dict]:
    """The paper's claims as checks on the grid's results: each with ``held`` (True, False, or
    None when the grid lacks what it needs) and the numbers behind it, decided over ``seeds``."""
    from pathanat.evaluation.claims import check_claims_over_seeds

    files = ("metrics.json", "analysis.json", "validity.json")
    by_seed = [{n: {f: _read(out / seed_folder(n, s), f) for f in files} for n in names}
               for s in range(seeds)]
    return check_claims_over_seeds(by_seed, dataset)


def print_claims(claims: list[dict]) -> None:
    from pathanat.evaluation.claims import verdict_text

    for claim in claims:
        print(f"claim    {claim['claim']}: {verdict_text(claim)} -- {claim['evidence']}")
