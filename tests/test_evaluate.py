"""evaluate: metrics of a tiny trained run on a tiny phantom; reproducibility; the NLL bound."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from pathanat.data.prepare import load_cache
from pathanat.errors import InputError, PathanatError
from pathanat.evaluation.evaluate import evaluate, evaluate_run
from pathanat.models import HierarchicalVAE, HVAEConfig
from pathanat.models.objectives import elbo_terms


def test_evaluate_run_writes_metrics_json_and_appends_a_csv_row(tiny_run):
    metrics = evaluate_run(tiny_run, iw_samples=2, progress=False, fid_samples=12)
    written = json.loads((tiny_run / "metrics.json").read_text())
    assert written["nll"]["iw_samples"] == 2 and written["seed"] == 0
    assert written["slices"] == 8 and written["subjects"] == 2  # 2 test subjects x 4 slices
    for entry in (written["nll"]["nats_per_slice"], written["reconstruction"]["psnr_brain"]):
        assert entry["ci_low"] <= entry["mean"] <= entry["ci_high"]
        assert entry["ci_method"].startswith("subject bootstrap")
    assert written["fid"]["fid_reconstruction"] > 0 and written["fid"]["fid_samples"] > 0
    assert written["fid"]["samples"] == 12 and written["fid"]["inputs"] == 8
    # the second-stage prior's draws are scored beside the model's own prior's
    assert written["fid"]["fid_samples_second_stage"] > 0
    assert written["fid"]["second_stage"].startswith("a Gaussian mixture")
    assert written["fid"]["second_stage_detail_steps"] == 0  # none unless the config asks
    staged = written["plausibility"]["second_stage"]
    assert 0 <= staged["brain_like"]["mean"] <= 1 and staged["n"] > 0
    # both kinds of draws get the copy test against the training split (24 slices here)
    for what in ("samples", "second_stage"):
        copies = written["novelty"][what]
        assert copies["draws"] == 12 and copies["held_out"] == 8 and copies["training"] == 24
        assert copies["distance_ratio"] > 0 and 0 <= copies["near_copies"] <= 1
    moved = written["nll"]["convergence"]  # S = 2 against 8 on the split's 8 slices
    assert moved["iw_samples_4x"] == 8 and moved["slices"] == 8
    assert np.isfinite(moved["move"]) and isinstance(moved["converged"], bool)
    # the floor: the validation split's real slices against the same test inputs
    floor = written["fid"]["floor"]
    assert floor["split"] == "val" and floor["slices"] == 8
    from pathanat.evaluation.fid import fid, inception_features

    cache = load_cache(tiny_run.parent / "cache")
    direct = fid(inception_features(np.asarray(cache.split("test").image)),
                 inception_features(np.asarray(cache.split("val").image)))
    assert floor["fid"] == pytest.approx(direct, rel=1e-6)
    assert floor["kid"]["ci_low"] <= floor["kid"]["mean"] <= floor["kid"]["ci_high"]
    # bits per dimension is the same number as nats per slice, in other units
    nats, bpd = written["nll"]["nats_per_slice"]["mean"], written["nll"]["bits_per_dim"]["mean"]
    assert bpd == pytest.approx(nats / (48 * 48 * np.log(2)))
    # an independent check of the whole-slice PSNR: recompute from the model's reconstruction
    from pathanat.runs import load_trained

    model, _ = load_trained(tiny_run)
    test = load_cache(tiny_run.parent / "cache").split("test")
    x = torch.tensor(np.array(test.image))[:, None]
    rec = model.reconstruct(x)[:, 0].numpy().astype(np.float64)
    ref = np.array(test.image, dtype=np.float64)
    mse = ((ref - rec) ** 2).mean(axis=(1, 2))
    psnr = 10 * np.log10(np.ptp(ref, axis=(1, 2)) ** 2 / mse)
    assert metrics["reconstruction"]["psnr"]["mean"] == pytest.approx(psnr.mean(), rel=1e-5)

    evaluate_run(tiny_run, iw_samples=2, with_fid=False, progress=False)
    rows = pd.read_csv(tiny_run / "metrics_eval.csv")
    assert len(rows) >= 2 and rows["iw_samples"].iloc[-1] == 2
    assert np.isnan(rows["fid_samples"].iloc[-1]) and rows["fid_samples"].iloc[-2] > 0
    assert rows["fid_sample_draws"].iloc[-2] == 12 and rows["fid_floor"].iloc[-2] > 0
    assert not list(tiny_run.glob(".*tmp-write"))  # nothing left half-written


def test_same_seed_same_numbers_other_seed_other_nll(tiny_run):
    from pathanat.runs import load_trained

    model, _ = load_trained(tiny_run)
    test = load_cache(tiny_run.parent / "cache").split("test")
    torch.manual_seed(123)
    a, slices_a = evaluate(model, test, iw_samples=3, seed=5, batch_size=3, with_fid=False)
    torch.manual_seed(456)  # the caller's RNG state plays no part
    b, slices_b = evaluate(model, test, iw_samples=3, seed=5, batch_size=3, with_fid=False)
    c, _ = evaluate(model, test, iw_samples=3, seed=6, batch_size=3, with_fid=False)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    pd.testing.assert_frame_equal(slices_a, slices_b)
    assert c["nll"]["nats_per_slice"]["mean"] != a["nll"]["nats_per_slice"]["mean"]


def test_bad_arguments_are_named(tiny_run):
    with pytest.raises(InputError, match="split"):
        evaluate_run(tiny_run, split="validation", progress=False)
    with pytest.raises(PathanatError, match="iw_samples"):
        evaluate_run(tiny_run, iw_samples=0, progress=False)
    with pytest.raises(PathanatError, match="fid_samples"):
        evaluate_run(tiny_run, iw_samples=1, progress=False, fid_samples=2)
    with pytest.raises(PathanatError, match="not a run folder"):
        evaluate_run(tiny_run.parent, progress=False)


@pytest.fixture(scope="module")
def random_model_and_images():
    """An untrained nvmp (VampPrior z_0: the Monte Carlo KL path) and a few smooth images."""
    torch.manual_seed(0)
    model = HierarchicalVAE(
        HVAEConfig(kind="nvmp", image_size=(16, 16), levels=2, width=8, cells_per_scale=1,
                   pseudo_inputs=3)
    ).eval()
    grid = torch.linspace(-1, 1, 16)
    x = torch.stack([torch.cos(3 * k * grid)[:, None] * grid[None, :] for k in (1, 2, 3)])
    return model, x[:, None]


def test_nll_at_one_sample_is_minus_the_elbo_in_expectation(random_model_and_images):
    model, x = random_model_and_images
    reps = 200
    torch.manual_seed(1)
    with torch.no_grad():
        iw = torch.stack([model.importance_weighted_log_likelihood(x, 1) for _ in range(reps)])
        elbo = torch.stack([elbo_terms(model(x), x, model.config.kind).elbo for _ in range(reps)])
    # both are unbiased estimates of the same ELBO: their means agree within Monte Carlo error
    se = torch.sqrt(iw.var(0) / reps + elbo.var(0) / reps)
    assert (iw.mean(0) - elbo.mean(0)).abs().max() < 4 * se.max()
    assert se.max() < 0.05 * elbo.mean(0).abs().min()  # the check has power


def test_nll_falls_as_the_sample_count_grows(random_model_and_images):
    model, x = random_model_and_images
    torch.manual_seed(2)
    nll = {
        s: -torch.stack([model.importance_weighted_log_likelihood(x, s) for _ in range(20)]).mean()
        for s in (1, 8, 64)
    }
    assert nll[1] > nll[8] > nll[64]


def test_binned_nll_is_a_code_length_where_the_continuous_one_goes_below_zero():
    """A decoder that puts its sharpest Gaussian on a constant background: the continuous density
    exceeds 1 per pixel (a negative NLL, below 0 bits/dim), the probability of each pixel's bin
    cannot (the binned NLL stays >= 0)."""
    from pathanat.evaluation.evaluate import NLL_BINS

    torch.manual_seed(0)
    model = HierarchicalVAE(HVAEConfig(kind="nvae", image_size=(16, 16), levels=2, width=8,
                                       cells_per_scale=1)).eval()
    with torch.no_grad():  # mean 0.01 everywhere, log-scale at its floor; posteriors = priors
        model.decoder.out.weight.zero_()
        model.decoder.out.bias.copy_(torch.tensor([0.01, -50.0]))
        for head in model.encoder.heads:
            head.conv.weight.zero_()
            head.conv.bias.zero_()
    x = torch.zeros(3, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 0.02  # inside the same bin as the background
    torch.manual_seed(1)
    continuous = model.importance_weighted_log_likelihood(x, 4)
    torch.manual_seed(1)
    binned = model.importance_weighted_log_likelihood(x, 4, bins=NLL_BINS)
    assert (continuous > 0).all()  # density > 1: "negative bits"
    assert (binned < 0).all()
    # every pixel lies in the bin [0, 1/32): log P(x) = 256 log P(that bin), the KL being 0
    bin_probability = norm.cdf(1 / 32, 0.01, np.exp(-4.0)) - norm.cdf(0.0, 0.01, np.exp(-4.0))
    np.testing.assert_allclose(binned.numpy(), 256 * np.log(bin_probability), rtol=1e-4)


def test_evaluate_reports_binned_continuous_and_regional_bits(tiny_run):
    from pathanat.runs import load_trained

    model, _ = load_trained(tiny_run)
    test = load_cache(tiny_run.parent / "cache").split("test")
    metrics, per_slice = evaluate(model, test, iw_samples=2, with_fid=False)
    nll = metrics["nll"]
    assert nll["bins"]["levels"] == 256
    assert (per_slice["nll_nats"] >= 0).all() and nll["bits_per_dim"]["mean"] >= 0
    assert set(nll["continuous"]) >= {"nats_per_slice", "bits_per_dim", "what"}
    brain = np.asarray(test.brain).astype(bool)
    for name, region in (("brain", brain), ("background", ~brain)):
        entry = nll["regions"][name]
        assert entry["ci_low"] <= entry["mean"] <= entry["ci_high"] and entry["mean"] > 0
        assert per_slice[f"bits_per_pixel_{name}"].notna().sum() == region.any((1, 2)).sum()


def test_the_iw_bound_is_called_converged_only_when_4s_samples_barely_move_it():
    from pathanat.evaluation.evaluate import convergence

    estimate = {"mean": 100.0, "ci_low": 90.0, "ci_high": 110.0}  # half-width 10
    at_s = np.array([100.0, 104.0])
    assert convergence(at_s, at_s - 3.0, estimate, 8)["converged"]
    loose = convergence(at_s, at_s - 25.0, estimate, 8)
    assert not loose["converged"] and loose["move"] == pytest.approx(25.0)
    assert loose["iw_samples_4x"] == 32 and loose["slices"] == 2


def test_the_second_stage_is_fitted_once_per_checkpoint_and_refitted_when_stale(
        tiny_run, tmp_path, capsys):
    import os
    import shutil

    from pathanat.models.second_stage import fit_model_second_stage
    from pathanat.runs import SECOND_STAGE_FILE, open_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(SECOND_STAGE_FILE))
    opened = open_run(run)
    first = opened.second_stage(seed=3)
    stored = run / SECOND_STAGE_FILE
    written = stored.stat().st_mtime_ns
    again = open_run(run).second_stage(seed=3)  # read back, not fitted
    assert stored.stat().st_mtime_ns == written
    direct = fit_model_second_stage(opened.model, opened.cache.split("train").image,
                                    opened.cache.split("val").image, seed=3)
    for prior in (first, again):
        assert prior.shapes == direct.shapes and prior.spread == direct.spread
        for name in ("mean", "directions", "weights", "means", "cholesky", "noise"):
            assert torch.equal(getattr(prior, name), getattr(direct, name)), name
    # another seed, a newer checkpoint or a damaged file: fitted again
    opened.second_stage(seed=4)
    assert stored.stat().st_mtime_ns > written
    written = stored.stat().st_mtime_ns
    checkpoint = run / "checkpoints" / "last.ckpt"
    os.utime(checkpoint, ns=(written + 10**9, written + 10**9))
    opened.second_stage(seed=4)
    assert stored.stat().st_mtime_ns > written
    stored.write_bytes(b"not a torch file")
    prior = opened.second_stage(seed=3)
    assert "unreadable" in capsys.readouterr().err
    assert torch.equal(prior.mean, direct.mean)
