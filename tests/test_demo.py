"""`pathanat demo`, the README's main job, end to end at a tiny size: every stage runs, the report
holds the run's numbers, and a second call reuses what is there."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import pathanat.demo as demo
from pathanat.experiment import load_experiment

TINY = ["model.width=8", "trainer.max_steps=3", "trainer.val_every=3", "trainer.val_batches=1",
        "trainer.checkpoint_every=3", "trainer.log_every=1", "trainer.progress_bar=false",
        "trainer.precision=32"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setattr(demo, "demo_config", lambda cache: load_experiment(
        "demo", [f"data.cache={cache}", "data.phantom=null", *TINY]))
    patch.setattr(demo, "DEMO_BUDGET", replace(demo.DEMO_BUDGET, iw_samples=2, fid=False,
                                                validity_samples=8, segmenter_steps=5))
    out = tmp_path_factory.mktemp("demo")
    report = demo.run_demo(out, n_subjects=10)
    yield out, report
    patch.undo()


def test_the_demo_runs_every_stage_into_one_report(tiny_demo, capsys):
    out, report = tiny_demo
    run = out / "run"
    assert report == out / "report.html"
    for name in ("metrics.json", "analysis.json", "validity.json", "counterfactual.json",
                 "synthesis.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    html = report.read_text()
    # the report shows the evaluation's own number (PSNR, exact value kept in data-value)
    assert repr(metrics["reconstruction"]["psnr"]["mean"]) in html
    assert (run / "figures" / "prepared_slices.png").is_file()
    assert (run / "figures" / "prepared_slices.txt").read_text().strip()


def test_a_second_demo_reuses_every_finished_step(tiny_demo, capsys):
    out, _ = tiny_demo
    outputs = [out / "run" / n for n in ("checkpoints/last.ckpt", "metrics.json",
                                         "analysis.json", "validity.json", "synthesis.json")]
    before = [p.stat().st_mtime_ns for p in outputs]
    demo.run_demo(out, n_subjects=10)  # the fixture's tiny settings are still in place
    assert [p.stat().st_mtime_ns for p in outputs] == before
    printed = capsys.readouterr().out
    assert "reusing the phantom cohort" in printed and "reusing the finished run" in printed
