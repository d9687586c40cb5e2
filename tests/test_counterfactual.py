"""counterfactual: lesion detection on the tiny phantom run, against the ground-truth masks and
scikit-learn's average precision; the edits the swap scores are the model's own operations; the
run-folder stage and its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from pathanat import runs
from pathanat.data.prepare import load_cache
from pathanat.errors import PathanatError
from pathanat.evaluation import counterfactual
from pathanat.evaluation.counterfactual import counterfactual_run, lesion_detection
from pathanat.models.edit import mix
from pathanat.runs import load_trained, run_cache

SEGMENTER_STEPS = 400  # as tests/test_segmenters.py: the tiny cache's segmenters are shared


@pytest.fixture(scope="module")
def tiny_cache(tiny_run):
    return run_cache(tiny_run, load_trained(tiny_run)[1])


def test_a_score_that_is_the_mask_detects_exactly_and_intensity_matches_sklearn(tiny_cache):
    val, test = tiny_cache.split("val"), tiny_cache.split("test")
    masks = [np.asarray(d.lesion, dtype=np.float32) for d in (val, test)]
    exact = lesion_detection(*masks, val, test, seed=0)
    assert exact["auprc"]["mean"] == pytest.approx(1.0)
    assert exact["dice"]["mean"] == pytest.approx(1.0)

    intensity = lesion_detection(np.asarray(val.image), np.asarray(test.image), val, test, seed=0)
    brain = np.asarray(test.brain) > 0
    expected = average_precision_score((np.asarray(test.lesion) > 0)[brain],
                                       np.asarray(test.image)[brain])
    # binned into at most 4096 quantile bins, so equal up to the rounding of the scores
    assert intensity["auprc"]["mean"] == pytest.approx(expected, abs=0.01)
    assert intensity["n_subjects"] == len(set(test.slices["subject"]))


def test_the_val_threshold_is_not_fit_on_test(tiny_cache):
    """Test scores that are the mask (0 or 1) beside validation scores that are the mask on
    another scale (2 or 4): the threshold chosen on validation lies above every test score, so
    test Dice at it is 0 while the best Dice (fit on test) is 1."""
    val, test = tiny_cache.split("val"), tiny_cache.split("test")
    row = lesion_detection(2 + 2 * np.asarray(val.lesion, dtype=np.float32),
                           np.asarray(test.lesion, dtype=np.float32), val, test, seed=0)
    assert row["threshold"] > 2
    assert row["best_dice"]["mean"] == pytest.approx(1.0)
    assert row["dice"]["mean"] == 0.0


@torch.no_grad()
def test_the_mix_and_the_redraw_are_the_model_s_own_operations(tiny_run, tiny_cache):
    model = load_trained(tiny_run)[0].float().eval()
    test = tiny_cache.split("test")
    a, b = np.asarray(test.image[:3]), np.asarray(test.image[3:6])
    expected = mix(model, torch.tensor(a)[:, None], torch.tensor(b)[:, None], from_a=[1, 2],
                   mode="value").x_mean[:, 0].numpy()
    za, zb = (counterfactual.encoded(model, x, batch_size=2) for x in (a, b))
    swapped = counterfactual.decoded(model, counterfactual.swapped(za, zb, [1, 2]), a.shape[1:],
                                     batch_size=2)
    np.testing.assert_allclose(swapped, expected, atol=1e-5)
    # every group kept: a redraw at any temperature is the reconstruction
    drawn = counterfactual.redrawn(model, a, [], draws=2, temperature=1.0, batch_size=4)
    assert drawn.shape == (3, 2, *a.shape[1:])
    recon = model.reconstruct(torch.tensor(a)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(drawn, np.repeat(recon[:, None], 2, axis=1), atol=1e-5)
    twice = counterfactual.null_edits(model, recon, (1, 2), batch_size=4)
    once = model.reconstruct(torch.tensor(recon)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(twice[1], once, atol=1e-5)
    np.testing.assert_allclose(
        twice[2], model.reconstruct(torch.tensor(once)[:, None])[:, 0].numpy(), atol=1e-5)


def test_the_pseudo_healthy_image_keeps_the_anatomy_and_redraws_pathology_at_t0(tiny_run):
    """With every group but one kept, the pseudo-healthy image is the decoding of the posterior
    means with that one group at its prior mean given the groups above, the groups below keeping
    their standardised residuals under the new context."""
    model, config = load_trained(tiny_run)
    model = model.float().eval()
    x = torch.tensor(np.asarray(load_cache(config.data.cache).split("test").image[:3]))[:, None]
    enc = model.encode(x)

    def choose(level, prior, state):
        if level == 2:
            return prior.mu
        return enc.z[level] if level < 2 else prior.mu + prior.sigma * enc.residuals[level]

    by_hand = model.generate(len(x), enc.input_size, choose).x_mean
    torch.testing.assert_close(counterfactual.pseudo_healthy(model, x, [2]), by_hand)
    torch.testing.assert_close(counterfactual.pseudo_healthy(model, x, []), model.reconstruct(x))


def test_counterfactual_run_writes_the_records_and_figures(tiny_run, tiny_cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "analysis.json").unlink(missing_ok=True)  # another test may have analysed tiny_run
    with pytest.raises(PathanatError, match="pathanat analyze"):
        counterfactual_run(run)  # unsupervised, no analysis.json: no pathology groups known
    result = counterfactual_run(run, pathology_groups=[3], segmenter_steps=SEGMENTER_STEPS,
                                progress=False)
    assert json.loads((run / counterfactual.COUNTERFACTUAL_JSON).read_text()) == result
    assert result["pathology_groups"] == [3] and result["pathology_source"] == "flag"
    assert list(result["detection"]) == ["pseudo-healthy residual", "reconstruction residual",
                                         "intensity"]
    for row in result["detection"].values():
        assert 0 <= row["auprc"]["ci_low"] <= row["auprc"]["mean"] <= row["auprc"]["ci_high"] <= 1
    intensity = result["detection"]["intensity"]  # FLAIR lesions are bright: better than chance
    assert intensity["auprc"]["mean"] > 2 * intensity["prevalence"]
    assert (run / counterfactual.FIGURE).read_bytes()[:4] == b"\x89PNG"
    assert "validation-chosen threshold" in (run / counterfactual.FIGURE).with_suffix(
        ".txt").read_text()
    assert (run / counterfactual.SWAP_FIGURE).read_bytes()[:4] == b"\x89PNG"

    swap = result["swap"]
    test = tiny_cache.split("test")
    subjects = test.slices["subject"].to_numpy()
    # each slice a with lesions gets one donor per other subject: the tiny test split has two
    lesioned = (np.asarray(test.lesion) > 0).sum(axis=(1, 2))
    strong = lesioned >= np.median(lesioned[lesioned > 0])
    assert swap["pairs"] == strong.sum() * (len(set(subjects)) - 1)
    effect = swap["effectiveness"]
    for estimate in (swap["anatomy"]["tissue_dice"]["brain"], swap["reversibility"]["ssim"]):
        assert 0 <= estimate["ci_low"] <= estimate["mean"] <= estimate["ci_high"] <= 1
    # undefined on 2 test subjects when the 6-step model finds no lesion area or changes nothing
    for estimate in (effect["area_correlation"], swap["minimality"]):
        if estimate["mean"] is not None and estimate["ci_low"] is not None:
            assert estimate["ci_low"] <= estimate["mean"] <= estimate["ci_high"]
    assert set(result["composition"]) == {"slices", "1", "10"}
    assert result["conditional"]["draws"] == counterfactual.CONDITIONAL_DRAWS
    assert 0 <= result["conditional"]["lesion_in_valid_tissue"]["n"] <= result[
        "conditional"]["sources"]
    assert swap["anatomy"]["factors"]["factors"][0] == "z_mm"


def test_counterfactual_run_is_seeded_even_where_t0_picks_a_vampprior_component(tiny_run,
                                                                                tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    first, again = (counterfactual_run(run, pathology_groups=[0], progress=False,
                                       segmenter_steps=SEGMENTER_STEPS) for _ in range(2))
    first.pop("seconds"), again.pop("seconds")
    assert first == again


def test_counterfactual_run_refuses_a_cache_without_lesions(tiny_run, tiny_cache, tmp_path,
                                                             monkeypatch):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["arrays"] = ["image", "brain", "dseg"]  # as an AD cache
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(runs, "run_cache", lambda folder, config: load_cache(copy))
    with pytest.raises(PathanatError, match="MS-only"):
        counterfactual_run(tiny_run, pathology_groups=[2])
    assert not (tiny_run / counterfactual.COUNTERFACTUAL_JSON).exists()
