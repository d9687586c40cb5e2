"""Fault injection: what a bad config value, a damaged derived file, a kill -9 or a second
invocation on the same output does to pathanat. Each case ends in a clear one-line error that
names what is wrong, or in a rebuild -- never a traceback, never a half-written result.

(Kill -9 and a damaged checkpoint during training, a damaged FID feature cache and damaged
segmenter weights have their own tests beside the code they exercise: test_training, test_fid,
test_segmenters; the write-aside helpers' own kill and lock cases are in test_atomic.)"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_run
from pathanat.cli import main
from pathanat.errors import ConfigError
from pathanat.experiment import ExperimentConfig, load_experiment

PATHANAT = [sys.executable, "-c", "import sys; from pathanat.cli import main; sys.exit(main())"]


# ---- every config float --------------------------------------------------------------------


def float_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every float (or optional float) setting of a config dataclass tree."""
    keys = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        target = inner[0] if len(inner) == 1 else kind
        if dataclasses.is_dataclass(target):
            keys += float_keys(target, f"{prefix}{f.name}.")
        elif target is float:
            keys.append(f"{prefix}{f.name}")
    return keys


FLOATS = float_keys(ExperimentConfig)


def test_the_config_tree_has_the_floats_we_expect_to_check():
    assert {"optim.lr", "optim.weight_decay", "optim.grad_clip", "objective.kl_scale",
            "data.flip_prob"} <= set(FLOATS)


@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf", "-1.0"])
@pytest.mark.parametrize("key", FLOATS)
def test_every_config_float_refuses_non_finite_and_negative_values_by_name(key, raw):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_experiment("demo", [f"{key}={raw}"])


# ---- damaged derived files -----------------------------------------------------------------


@pytest.fixture(scope="module")
def own_run(tmp_path_factory) -> Path:
    """A tiny run of this module's own (its cache is damaged and restored here), evaluated and
    analysed once so its outputs exist."""
    run = make_tiny_run(tmp_path_factory.mktemp("faults"))
    assert main(["evaluate", str(run), "--no-fid", "--iw-samples", "2"]) == 0
    assert main(["analyze", str(run)]) == 0
    return run


def cache_of(run: Path) -> Path:
    return run.parent / "cache"


@contextlib.contextmanager
def damaged(path: Path, how: str) -> Iterator[None]:
    """``path`` truncated to a third or overwritten with garbage, restored afterwards."""
    original = path.read_bytes()
    try:
        path.write_bytes(original[: len(original) // 3] if how == "truncated"
                         else b"\x00\xffnot what was written{[" * 7)
        yield
    finally:
        path.write_bytes(original)


DAMAGE = [
    # (command, file: "run/..." or "cache/...", how)
    (["evaluate", "--no-fid", "--iw-samples", "2"], "cache/test_image.npy", "truncated"),
    (["evaluate", "--no-fid", "--iw-samples", "2"], "cache/test_image.npy", "garbage"),
    (["evaluate", "--no-fid", "--iw-samples", "2"], "cache/manifest.json", "garbage"),
    (["evaluate", "--no-fid", "--iw-samples", "2"], "cache/test_slices.tsv", "garbage"),
    (["evaluate", "--no-fid", "--iw-samples", "2"], "run/config.yaml", "garbage"),
    (["analyze"], "cache/train_brain.npy", "truncated"),
    (["report"], "run/metrics.json", "garbage"),
    (["report"], "run/metrics.json", "truncated"),
    (["report"], "run/analysis.json", "garbage"),
    (["report"], "run/summary.json", "garbage"),
    (["report"], "run/metrics.csv", "garbage"),
    (["synthesize", "--what", "style-mix"], "run/analysis.json", "garbage"),
]


@pytest.mark.parametrize(("command", "where", "how"), DAMAGE,
                         ids=[f"{c[0]}-{w}-{h}" for c, w, h in DAMAGE])
def test_a_damaged_file_gets_one_line_that_names_it(own_run, tmp_path, capsys, command, where,
                                                    how):
    folder, name = where.split("/", 1)
    path = (own_run if folder == "run" else cache_of(own_run)) / name
    args = [command[0], str(own_run), *command[1:]]
    if command[0] == "report":
        args += ["--out", str(tmp_path / "report.html")]
    with damaged(path, how):
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert name in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_damaged_segmenter_weights_are_trained_again(own_run, monkeypatch):
    from pathanat.data.prepare import load_cache
    from pathanat.evaluation import segmenters as seg

    cache = load_cache(cache_of(own_run))
    seg.cohort_segmenters(cache, steps=2)
    trained = []
    real = seg.train_segmenters
    monkeypatch.setattr(seg, "train_segmenters",
                        lambda *a, **k: trained.append(1) or real(*a, **k))
    weights = cache_of(own_run) / seg.FOLDER / seg.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:500])
    again = seg.cohort_segmenters(cache, steps=2)
    assert trained == [1] and again.manifest_sha256 == seg.manifest_sha256(cache)
    seg.load_segmenters(weights)  # whole again


# ---- kill -9 ---------------------------------------------------------------------------------


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if "tmp-write" in p.name or p.name.endswith(".lock")]


def killed_at(args: list[str], delay: float, cwd: Path) -> int:
    """Start ``pathanat args``, kill -9 it after ``delay`` seconds (or let it finish first)."""
    proc = subprocess.Popen([*PATHANAT, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


TIMING = {"seconds", "wall_s", "run", "time_utc"}  # where and when, not what was measured


def json_without_timing(path: Path) -> dict:
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads(path.read_text()))


def same_result(a: object, b: object) -> bool:
    """Equal structure and values, floats to 1e-6 relative: a float32 reduction may round
    differently in another process (seen once, at 1e-8 relative, in a suite run under load)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_result(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_result(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


@pytest.mark.parametrize("stage", ["evaluate", pytest.param("analyze", marks=pytest.mark.slow)])
def test_a_stage_killed_anywhere_leaves_nothing_half_written_and_reruns_to_the_same_result(
        own_run, tmp_path, stage):
    output = {"evaluate": "metrics.json", "analyze": "analysis.json"}[stage]
    extra = ["--no-fid", "--iw-samples", "2"] if stage == "evaluate" else []
    reference = json_without_timing(own_run / output)
    run = tmp_path / "run"
    shutil.copytree(own_run, run)
    (run / output).unlink()
    start = time.perf_counter()
    assert killed_at([stage, str(run), *extra], 600, tmp_path) == 0
    whole = time.perf_counter() - start
    (run / output).unlink()
    rng = np.random.default_rng(0)
    for delay in sorted(rng.uniform(0.3, whole, 3)):
        killed_at([stage, str(run), *extra], delay, tmp_path)
        if (run / output).exists():  # written whole, or not at all
            assert same_result(json_without_timing(run / output), reference)
            (run / output).unlink()
    assert main([stage, str(run), *extra]) == 0
    assert same_result(json_without_timing(run / output), reference)
    assert temporaries(run) == []


def test_prepare_killed_anywhere_leaves_no_cache_or_a_whole_one(own_run, tmp_path):
    cohort = own_run.parent / "cohort"
    args = ["prepare", "--cohort", str(cohort), "--in-plane-mm", "4", "--slices", "4", "--shape",
            "48", "48", "--workers", "1", "--quiet"]
    reference = cache_of(own_run)
    start = time.perf_counter()
    assert killed_at([*args, "--out", str(tmp_path / "whole")], 600, tmp_path) == 0
    whole = time.perf_counter() - start
    rng = np.random.default_rng(1)
    for i, delay in enumerate(sorted(rng.uniform(0.3, whole, 3))):
        out = tmp_path / f"killed{i}"
        killed_at([*args, "--out", str(out)], delay, tmp_path)
        if out.exists():  # renamed into place: whole
            assert (out / "manifest.json").is_file()
        assert killed_at([*args, "--out", str(out)] + (["--overwrite"] if out.exists() else []),
                         600, tmp_path) == 0
        for name in ("test_image.npy", "train_lesion.npy", "val_dseg.npy"):
            np.testing.assert_array_equal(np.load(out / name), np.load(reference / name))
        assert temporaries(tmp_path) == []


# ---- two invocations on one output ---------------------------------------------------------


def test_two_prepares_of_one_output_at_once_one_wins_and_the_other_says_why(own_run, tmp_path):
    cohort = own_run.parent / "cohort"
    args = [*PATHANAT, "prepare", "--cohort", str(cohort), "--in-plane-mm", "4", "--slices", "4",
            "--shape", "48", "48", "--workers", "1", "--quiet", "--out", str(tmp_path / "cache")]
    first, second = (subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for _ in range(2))
    results = [(p.wait(), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "cache" in loser and "Traceback" not in loser
    assert (tmp_path / "cache" / "manifest.json").is_file()
    assert temporaries(tmp_path) == []


def test_reproduce_computes_a_damaged_stage_output_again(own_run, capsys):
    from pathanat.reproduce import is_current

    output = own_run / "analysis.json"
    os.utime(output)  # written after the last checkpoint
    assert is_current(output, own_run)
    with damaged(output, "truncated"):
        os.utime(output)
        assert not is_current(output, own_run)
    assert "analysis.json: not a readable JSON file" in capsys.readouterr().err


STAGES = [["evaluate", "--no-fid", "--iw-samples", "2"], ["analyze"], ["validity"],
          ["counterfactual"], ["synthesize"]]


@pytest.mark.parametrize("command", STAGES, ids=[c[0] for c in STAGES])
def test_a_stage_running_on_a_run_stops_a_second_one_with_a_reason(own_run, capsys, command):
    from pathanat.atomic import exclusive

    before = {p.name: p.stat().st_mtime for p in own_run.glob("*.json")}
    with exclusive(own_run / f".{command[0]}.lock", "held by this test"):
        code = main([command[0], str(own_run), *command[1:]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"another `pathanat {command[0]}` is running on this run" in err
    assert {p.name: p.stat().st_mtime for p in own_run.glob("*.json")} == before
    assert not (own_run / f".{command[0]}.lock").exists()


def test_a_run_being_trained_stops_a_second_train_or_resume_of_it(own_run, tmp_path, capsys):
    from pathanat.atomic import exclusive

    with exclusive(own_run.with_name(f".{own_run.name}.lock"), "held by this test"):
        resumed = main(["train", "--resume", str(own_run), "trainer.max_steps=8"])
        fresh = main(["train", "demo", "--out", str(own_run), "--overwrite"])
    err = capsys.readouterr().err
    assert resumed == fresh == 2, err
    assert err.count("is being trained by another process right now") == 2
    assert (own_run / "checkpoints" / "last.ckpt").is_file()  # the overwrite did not start


@pytest.mark.slow
def test_reproduce_killed_anywhere_finishes_on_a_rerun_with_nothing_half_written(own_run,
                                                                                 tmp_path):
    from pathanat.data.prepare import load_cache
    from pathanat.evaluation.segmenters import cohort_segmenters

    cache = cache_of(own_run)
    cohort_segmenters(load_cache(cache), steps=2)  # as reproduce's smoke budget would reuse them
    args = ["reproduce", "--dataset", "ms", "--budget", "smoke", "--cache", str(cache), "--runs",
            "vae_ms", "--out", str(tmp_path / "grid")]
    start = time.perf_counter()
    assert killed_at([*args[:-1], str(tmp_path / "whole")], 1800, tmp_path) == 0
    whole = time.perf_counter() - start
    for delay in sorted(np.random.default_rng(2).uniform(1.0, whole, 3)):
        killed_at(args, delay, tmp_path)
        for record in (tmp_path / "grid").rglob("*.json"):
            json.loads(record.read_text())  # whatever is there is whole
    assert killed_at(args, 1800, tmp_path) == 0
    for output in ("metrics.json", "analysis.json", "validity.json", "counterfactual.json",
                   "synthesis.json"):
        assert (tmp_path / "grid" / "vae_ms" / output).is_file()
    # training resumes bit-identically and the stages are seeded: the same numbers
    for output in ("metrics.json", "analysis.json"):
        assert (json_without_timing(tmp_path / "grid" / "vae_ms" / output)
                == json_without_timing(tmp_path / "whole" / "vae_ms" / output))
    assert (tmp_path / "grid" / "report.html").is_file()
    assert temporaries(tmp_path / "grid") == []
