"""`pathanat reproduce`: the grid runs every stage, resumes without redoing, refuses to mix runs."""

from __future__ import annotations

import json
import shutil
from html import unescape

import pytest

from pathanat.cli import main
from pathanat.data.prepare import load_cache
from pathanat.errors import PathanatError
from pathanat.evaluation.segmenters import cohort_segmenters
from pathanat.experiment import load_experiment
from pathanat.reproduce import (
    BUDGETS,
    DRAWS_FROM_SECOND_STAGE,
    cpu_precision,
    grid,
    reproduce,
    run_config,
)

RUNS = ["vae_ms", "nvmp_ms_sup"]
SEGMENTER_TEST_STEPS = 400  # as tests/test_segmenters.py


@pytest.fixture(scope="module")
def tiny_grid(tiny_run, tmp_path_factory):
    cache = tiny_run.parent / "cache"
    # the cohort's segmenters, trained as briefly as their own tests do (and shared with them)
    cohort_segmenters(load_cache(cache), steps=SEGMENTER_TEST_STEPS)
    out = tmp_path_factory.mktemp("grid") / "reproduce"
    reproduce("ms", "smoke", out=out, cache=cache, runs=RUNS)
    return out, cache


def test_the_grids_are_the_papers():
    assert grid("ms") == ["vae_ms", "nvae_ms", "nvmp_ms", "nvmpplus_ms", "vae_ms_sup",
                          "nvae_ms_sup", "nvmp_ms_sup", "nvmpplus_ms_sup"]
    assert grid("ad") == ["vae_ad", "nvae_ad", "nvmp_ad", "nvmpplus_ad"]
    with pytest.raises(PathanatError, match="--dataset: expected one of ms, ad, got 'pd'"):
        grid("pd")


def test_a_budget_changes_only_compute_not_the_model_kind(tmp_path):
    for name in grid("ms"):
        shipped = load_experiment(name)
        config = run_config(name, BUDGETS["cpu"], tmp_path, None)
        assert config.model.kind == shipped.model.kind
        assert config.model.supervised == shipped.model.supervised
        assert config.model.z_p == shipped.model.z_p
        assert config.data.phantom.subjects == BUDGETS["cpu"].subjects
        assert config.trainer.precision == cpu_precision()
        assert config.model.posterior == shipped.model.posterior
        # the one model change the small budgets make: a prior that generates (vae and nvae)
        assert shipped.model.unconditional_prior == "standard"
        assert config.model.unconditional_prior == "fitted"
    # the paper budget is the packaged config unchanged but for where the phantom goes
    paper = run_config("nvmpplus_ms", BUDGETS["paper"], tmp_path, None)
    assert paper.trainer.max_steps == 100_000 and paper.model.width == 32
    assert run_config("vae_ms", BUDGETS["paper"], tmp_path, None).model.unconditional_prior == (
        "standard"
    )


def test_every_stage_writes_its_output_and_the_report_covers_the_runs(tiny_grid):
    out, _ = tiny_grid
    for name in RUNS:
        run = out / name
        assert json.loads((run / "summary.json").read_text())["steps"] == 10
        for output in ("metrics.json", "analysis.json", "validity.json", "counterfactual.json",
                       "synthesis.json"):
            assert (run / output).is_file(), f"{name}/{output}"
    record = json.loads((out / "reproduce.json").read_text())
    assert record["runs"] == RUNS and record["budget"] == "smoke"
    assert set(record["seconds"]["vae_ms"]) >= {"train", "evaluate", "analyze", "validity",
                                                 "counterfactual", "synthesize"}
    # a grid of two runs can check no claim: each says so instead of deciding
    assert [c["held"] for c in record["claims"]] == [None, None, None, None]
    html = unescape((out / "report.html").read_text())  # the page's text, not its escapes
    assert all(name in html for name in RUNS)
    assert "The paper's claims on these runs" in html
    assert html.count("not checked (results missing)") == 4


def test_a_second_call_redoes_nothing(tiny_grid, capsys):
    out, cache = tiny_grid
    outputs = [out / n / f for n in RUNS for f in ("checkpoints/last.ckpt", "metrics.json",
                                                   "analysis.json", "validity.json",
                                                   "counterfactual.json", "synthesis.json")]
    before = [p.stat().st_mtime_ns for p in outputs]
    reproduce("ms", "smoke", out=out, cache=cache, runs=RUNS)
    assert [p.stat().st_mtime_ns for p in outputs] == before
    printed = capsys.readouterr().out
    assert printed.count(": done") == len(RUNS) * 6  # train + five stages, each run


def test_a_stale_output_is_redone(tiny_grid, tmp_path):
    out, cache = tiny_grid
    grid_copy = tmp_path / "copy"
    shutil.copytree(out, grid_copy)
    run = grid_copy / "vae_ms"
    metrics, analysis = (run / "metrics.json").stat().st_mtime_ns, (run / "analysis.json")
    analysis_mtime = analysis.stat().st_mtime_ns
    (run / "checkpoints" / "last.ckpt").touch()  # as if trained further after the evaluation
    reproduce("ms", "smoke", out=grid_copy, cache=cache, runs=["vae_ms"])
    assert (run / "metrics.json").stat().st_mtime_ns > metrics
    assert analysis.stat().st_mtime_ns > analysis_mtime


def test_an_unfinished_run_is_resumed_and_an_empty_folder_trained(tmp_path, monkeypatch):
    import pathanat.reproduce as module

    calls = []
    monkeypatch.setattr(module, "resume", lambda run, overrides: calls.append(("resume",
                                                                                overrides)))
    monkeypatch.setattr(module, "train_config", lambda config, run, overwrite: calls.append(
        ("train", overwrite)))
    config = run_config("vae_ms", BUDGETS["smoke"], tmp_path, None)
    run = tmp_path / "vae_ms"
    assert module.train_stage(run, config) == "trained"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "summary.json").write_text(json.dumps({"steps": 4}))
    assert module.train_stage(run, config) == "resumed"
    (run / "summary.json").write_text(json.dumps({"steps": 10}))
    assert module.train_stage(run, config) == "done"
    assert calls == [("train", True), ("resume", ["trainer.max_steps=10"])]


def test_a_run_folder_holding_another_model_stops_the_grid(tiny_grid, tmp_path, capsys):
    out, cache = tiny_grid
    grid_copy = tmp_path / "copy"
    shutil.copytree(out, grid_copy)
    config = grid_copy / "vae_ms" / "config.yaml"
    config.write_text(config.read_text().replace("width: 16", "width: 12"))
    code = main(["reproduce", "--dataset", "ms", "--budget", "smoke", "--out", str(grid_copy),
                 "--cache", str(cache), "--runs", "vae_ms"])
    assert code == 2
    assert "model settings differ" in capsys.readouterr().err
    # trained on a schedule twice as long: its weights are not the grid's 10-step run, and
    # resuming would not make them so
    shutil.rmtree(grid_copy)
    shutil.copytree(out, grid_copy)
    config.write_text(config.read_text().replace("max_steps: 10", "max_steps: 20"))
    code = main(["reproduce", "--dataset", "ms", "--budget", "smoke", "--out", str(grid_copy),
                 "--cache", str(cache), "--runs", "vae_ms"])
    assert code == 2
    assert "decays to 0 at step 20, this grid's at step 10" in capsys.readouterr().err


def test_a_drawn_detail_is_given_to_trained_runs_without_training_them_again(
        tiny_grid, tmp_path, monkeypatch, capsys):
    """--detail-steps on a finished grid: each run keeps its model, its config.yaml states the
    detail, the stages that draw from the second stage run again and draw with it, the others
    are kept; a later call without the option keeps the detail, and 0 takes it away."""
    import pathanat.runs
    from pathanat.models.detail import fit_detail
    from pathanat.models.second_stage import fit_second_stage, model_codes

    fitted = []

    def off_a_narrower_span(model, prior, images, steps, seed=0, progress=False):
        # the tiny run's span holds all 24 of its training codes (tests/test_detail.py)
        fitted.append(steps)
        codes, shapes = model_codes(model, images)
        return fit_detail(model, fit_second_stage(codes, shapes, dims=8), images, steps, seed)

    monkeypatch.setattr(pathanat.runs, "fit_detail", off_a_narrower_span)
    out, cache = tiny_grid
    grid_copy = tmp_path / "copy"
    shutil.copytree(out, grid_copy)
    run = grid_copy / "vae_ms"
    files = ("checkpoints/last.ckpt", "metrics.json", "analysis.json", "validity.json",
             "counterfactual.json", "synthesis.json")

    def written():
        return {f: (run / f).stat().st_mtime_ns for f in files}

    def call(*detail):
        return main(["reproduce", "--dataset", "ms", "--budget", "smoke", "--out",
                     str(grid_copy), "--cache", str(cache), "--runs", "vae_ms", *detail])

    before = written()
    assert call("--detail-steps", "5") == 0
    after = written()
    assert fitted == [5]
    assert load_experiment(run / "config.yaml").second_stage.detail_steps == 5
    for kept in ("checkpoints/last.ckpt", "analysis.json", "counterfactual.json"):
        assert after[kept] == before[kept], kept
    for redone in DRAWS_FROM_SECOND_STAGE:
        assert after[redone] > before[redone], redone
    caption = (run / "figures" / "synth_prior.txt").read_text()
    assert "drawn by a diffusion model (models.detail)" in caption
    assert json.loads((grid_copy / "reproduce.json").read_text())["detail_steps"] == 5
    assert "drawn detail fitted for 5 steps" in capsys.readouterr().out
    # without the option, the runs keep what they were given; nothing is redone
    assert call() == 0
    assert written() == after and fitted == [5]
    assert load_experiment(run / "config.yaml").second_stage.detail_steps == 5
    # 0 takes it away: the draws are the mixture's alone again
    assert call("--detail-steps", "0") == 0
    assert load_experiment(run / "config.yaml").second_stage.detail_steps == 0
    assert "models.detail" not in (run / "figures" / "synth_prior.txt").read_text()
    assert fitted == [5]
    with pytest.raises(PathanatError, match="--detail-steps: expected an integer >= 0"):
        reproduce("ms", "smoke", out=grid_copy, cache=cache, runs=["vae_ms"], detail_steps=-1)


def test_unknown_run_names_are_listed(tmp_path):
    with pytest.raises(PathanatError, match=r"--runs: \['nvmp_ad'\] not in the ms grid"):
        reproduce("ms", "smoke", out=tmp_path, runs=["nvmp_ad"])


def test_more_seeds_add_runs_beside_seed_0_and_a_spread_section(tiny_grid, tmp_path):
    import torch

    out, cache = tiny_grid
    grid_copy = tmp_path / "copy"
    shutil.copytree(out, grid_copy)
    seed0 = (grid_copy / "vae_ms" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    code = main(["reproduce", "--dataset", "ms", "--budget", "smoke", "--out", str(grid_copy),
                 "--cache", str(cache), "--runs", "vae_ms", "--seeds", "2"])
    assert code == 0
    # seed 0 is the run already there, not trained again; seed 1 is a new run with its own seed
    assert (grid_copy / "vae_ms" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == seed0
    seed1 = grid_copy / "vae_ms_seed1"
    assert load_experiment(seed1 / "config.yaml").trainer.seed == 1
    weights = [torch.load(grid_copy / f / "checkpoints" / "last.ckpt", weights_only=False,
                          map_location="cpu")["state_dict"] for f in ("vae_ms", "vae_ms_seed1")]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for output in ("metrics.json", "analysis.json", "validity.json", "synthesis.json"):
        assert (seed1 / output).is_file(), output
    record = json.loads((grid_copy / "reproduce.json").read_text())
    assert record["seeds"] == 2 and record["folders"] == ["vae_ms", "vae_ms_seed1"]
    assert "train" in record["seconds"]["vae_ms_seed1"]
    html = (grid_copy / "report.html").read_text()
    assert "Spread over training seeds" in html
    section = html.split("Spread over training seeds")[1]
    psnr = [json.loads((grid_copy / f / "metrics.json").read_text())["reconstruction"]["psnr"]
            ["mean"] for f in ("vae_ms", "vae_ms_seed1")]
    assert f"{sum(psnr) / 2:.2f} ±" in section  # the mean over the two seeds
    times = html.split("Time per stage")[1]  # the record's seconds, every folder of the grid
    assert "vae_ms_seed1" in times
    assert f">{record['seconds']['vae_ms_seed1']['train']:.0f}<" in times
    with pytest.raises(PathanatError, match="--seeds: expected an integer >= 1"):
        reproduce("ms", "smoke", out=grid_copy, cache=cache, runs=["vae_ms"], seeds=0)
