"""counterfactual: lesion detection on the tiny phantom run, against the ground-truth masks and
scikit-learn's average precision; the run-folder stage and its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from pathanat.data.prepare import load_cache
from pathanat.errors import PathanatError
from pathanat.evaluation import counterfactual
from pathanat.evaluation.counterfactual import counterfactual_run, lesion_detection
from pathanat.evaluation.evaluate import run_cache
from pathanat.training.run import load_trained


@pytest.fixture(scope="module")
def tiny_cache(tiny_run):
    return run_cache(tiny_run, load_trained(tiny_run)[1])


class MaskLookup:
    """A score that knows the truth: each slice's lesion mask, found by its pixels."""

    def __init__(self, *splits) -> None:
        self.images = torch.tensor(np.concatenate([np.asarray(s.image) for s in splits]))
        self.masks = torch.tensor(np.concatenate([np.asarray(s.lesion) > 0 for s in splits]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = [int(torch.nonzero((self.images == xi[0]).all(dim=(1, 2)))[0]) for xi in x]
        return self.masks[rows][:, None].float()


def test_a_score_that_is_the_mask_detects_exactly_and_intensity_matches_sklearn(tiny_cache):
    val, test = tiny_cache.split("val"), tiny_cache.split("test")
    exact, maps = lesion_detection(MaskLookup(val, test), val, test, seed=0)
    assert exact["auprc"]["mean"] == pytest.approx(1.0)
    assert exact["dice"]["mean"] == pytest.approx(1.0)
    np.testing.assert_array_equal(maps, np.asarray(test.lesion) > 0)

    intensity, _ = lesion_detection(lambda x: x, val, test, seed=0)
    brain = np.asarray(test.brain) > 0
    expected = average_precision_score((np.asarray(test.lesion) > 0)[brain],
                                       np.asarray(test.image)[brain])
    # binned into at most 4096 quantile bins, so equal up to the rounding of the scores
    assert intensity["auprc"]["mean"] == pytest.approx(expected, abs=0.01)
    assert intensity["n_subjects"] == len(set(test.slices["subject"]))


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

    by_hand = model._generated(len(x), enc.input_size, choose).x_mean
    torch.testing.assert_close(counterfactual.pseudo_healthy(model, x, [2]), by_hand)
    torch.testing.assert_close(counterfactual.pseudo_healthy(model, x, []), model.reconstruct(x))


def test_counterfactual_run_writes_the_table_and_figure(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "analysis.json").unlink(missing_ok=True)  # another test may have analysed tiny_run
    with pytest.raises(PathanatError, match="pathanat analyze"):
        counterfactual_run(run)  # unsupervised, no analysis.json: no pathology groups known
    result = counterfactual_run(run, pathology_groups=[3])
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


def test_counterfactual_run_is_seeded_even_where_t0_picks_a_vampprior_component(tiny_run,
                                                                                tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    first, again = (counterfactual_run(run, pathology_groups=[0]) for _ in range(2))
    first.pop("seconds"), again.pop("seconds")
    assert first == again


def test_counterfactual_run_refuses_a_cache_without_lesions(tiny_run, tiny_cache, tmp_path,
                                                             monkeypatch):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["arrays"] = ["image", "brain", "dseg"]  # as an AD cache
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(counterfactual, "run_cache", lambda folder, config: load_cache(copy))
    with pytest.raises(PathanatError, match="MS-only"):
        counterfactual_run(tiny_run, pathology_groups=[2])
    assert not (tiny_run / counterfactual.COUNTERFACTUAL_JSON).exists()
