import json
import shutil
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from pathanat import runs
from pathanat.data.phantom import BACKGROUND, CSF, GM, VENTRICLES, WM
from pathanat.data.prepare import load_cache
from pathanat.errors import PathanatError
from pathanat.evaluation import validity
from pathanat.evaluation.plausibility import brain_references
from pathanat.evaluation.segmenters import FOLDER, cohort_segmenters
from pathanat.figures import caption_path
from pathanat.runs import load_trained, run_cache

TEST_STEPS = 400  # as in test_segmenters.py (either module's segmenters serve both)

@pytest.fixture(scope="module")
def tiny_cache(tiny_run):
    return run_cache(tiny_run, load_trained(tiny_run)[1])


@pytest.fixture(scope="module")
def segmenters(tiny_cache):
    # The same call as test_segmenters.py: whichever module runs first trains, the other reuses.
    return cohort_segmenters(tiny_cache, steps=TEST_STEPS)


def test_rates_of_a_hand_built_case():
    tissue = np.full((3, 6, 6), WM, dtype=np.uint8)
    tissue[:, :, 4:] = CSF
    tissue[1, :, :2] = VENTRICLES
    tissue[1, 5, 2:4] = GM
    tissue[2, 0, :] = BACKGROUND
    lesion = np.zeros((3, 6, 6), dtype=bool)
    lesion[0, 0, 0:4] = True  # 4 on WM
    lesion[0, 1, 4:6] = True  # 2 on CSF
    lesion[1, 0:3, 0] = True  # 3 on ventricles
    lesion[1, 5, 2] = True  # 1 on GM
    lesion[2, 0, 0] = True  # 1 on background
    rates = validity.validity_rates(lesion, tissue, seed=0)
    assert rates["n"] == 3
    assert rates["lesion_voxels"] == 11
    assert rates["invalid_voxels"] == 6
    assert rates["invalid_fraction"] == pytest.approx(6 / 11)
    assert rates["slices_with_lesions"] == 3
    assert rates["per_label"] == pytest.approx(
        {"background": 1 / 11, "CSF": 2 / 11, "ventricles": 3 / 11, "GM": 1 / 11, "WM": 4 / 11,
         "hippocampus": 0.0}
    )
    assert 0 <= rates["ci_low"] <= 6 / 11 <= rates["ci_high"] <= 1


def test_bootstrap_interval_collapses_when_every_slice_has_the_same_rate():
    tissue = np.full((5, 4, 4), WM, dtype=np.uint8)
    tissue[:, 0, 0] = CSF
    lesion = np.zeros((5, 4, 4), dtype=bool)
    lesion[:, 0, :] = True  # 1 invalid of 4 on every slice
    rates = validity.validity_rates(lesion, tissue)
    assert rates["invalid_fraction"] == rates["ci_low"] == rates["ci_high"] == 0.25


def test_no_lesions_give_null_rates():
    rates = validity.validity_rates(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3), np.uint8))
    assert rates["lesion_voxels"] == 0
    assert rates["invalid_fraction"] is rates["ci_low"] is rates["ci_high"] is None


def test_truth_rate_is_zero_on_the_phantom(tiny_cache):
    test = tiny_cache.split("test")
    rates = validity.validity_rates(np.asarray(test.lesion, bool), np.asarray(test.dseg))
    assert rates["lesion_voxels"] > 0
    assert rates["invalid_fraction"] == 0.0
    assert rates["per_label"]["WM"] == 1.0


def blobs_in_ventricles(test, radius: float = 1.6, value: float = 2.5) -> np.ndarray:
    """Test slices with a bright disc painted into the ventricles, centred on the ventricle voxel
    deepest inside them (the disc is clipped to the ventricles, so all of it is invalid)."""
    images = np.array(test.image, dtype=np.float32)
    dseg = np.asarray(test.dseg)
    yy, xx = np.mgrid[: images.shape[1], : images.shape[2]]
    for i in range(len(images)):
        fluid = dseg[i] == VENTRICLES
        depth = ndi.distance_transform_edt(fluid)
        cy, cx = np.unravel_index(depth.argmax(), depth.shape)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & fluid
        images[i][disc] = value
    return images


class BlobModel:
    """A 'model' whose prior samples are test slices with lesions painted into the ventricles."""

    def __init__(self, images: np.ndarray):
        self.images = torch.tensor(images)
        self.drawn = 0

    def sample(self, n: int, temperature: float = 1.0, size=None) -> SimpleNamespace:
        idx = (self.drawn + torch.arange(n)) % len(self.images)
        self.drawn += n
        return SimpleNamespace(x_mean=self.images[idx][:, None])

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """A perfect autoencoder."""
        return x.clone()


class PaintingAutoencoder(BlobModel):
    """Reconstructs each slice with lesions painted into its ventricles."""

    def __init__(self, test) -> None:
        super().__init__(np.asarray(test.image, dtype=np.float32))
        self.painted = torch.tensor(blobs_in_ventricles(test))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        rows = [int(np.flatnonzero((self.images == xi[0]).all(dim=(1, 2)))[0]) for xi in x]
        return self.painted[rows][:, None]


def test_reconstructions_are_scored_on_the_test_slices(segmenters, tiny_cache):
    """A perfect autoencoder's reconstructions score as the real slices; one that paints lesions
    into the ventricles scores as those painted slices do when drawn."""
    test = tiny_cache.split("test")
    perfect = validity.sample_validity(BlobModel(np.asarray(test.image)), segmenters, test, n=4)
    assert perfect["reconstructions"] == perfect["real"]
    painting = validity.sample_validity(PaintingAutoencoder(test), segmenters, test, n=4)
    drawn = validity.sample_validity(BlobModel(blobs_in_ventricles(test)), segmenters, test,
                                     n=len(test))
    assert painting["reconstructions"] == drawn["samples"]
    assert painting["reconstructions"]["ci_low"] > perfect["real"]["ci_high"]


def test_lesions_painted_into_ventricles_are_invalid_real_ones_are_not(segmenters, tiny_cache):
    test = tiny_cache.split("test")
    painted = blobs_in_ventricles(test)
    result = validity.sample_validity(BlobModel(painted), segmenters, test, n=16, batch_size=5)
    assert result["samples"]["n"] == 16 and result["real"]["n"] == len(test)
    assert result["truth"]["invalid_fraction"] == 0.0
    # Perfect segmenters would find painted / (painted + real lesion voxels) invalid: ~0.5 here
    # (the samples keep the slices' real WM lesions). Measured after 400 steps (one thread):
    # samples 0.61, real 0.08 (2 of 25 voxels: lesion edges next to the 4 mm ventricles).
    n_painted = (painted != np.asarray(test.image)).sum()
    ideal = n_painted / (n_painted + np.asarray(test.lesion).sum())
    assert result["samples"]["invalid_fraction"] > ideal / 2
    assert result["real"]["invalid_fraction"] < 0.2
    assert result["samples"]["ci_low"] > result["real"]["ci_high"]


def test_only_brain_like_samples_are_counted(segmenters, tiny_cache):
    test = tiny_cache.split("test")
    painted = blobs_in_ventricles(test)
    noise = np.random.default_rng(0).normal(size=painted.shape).astype(np.float32) * 2
    half = np.concatenate([painted[:4], noise[:4]])  # 4 brains with bad lesions, 4 noise fields
    result = validity.sample_validity(BlobModel(half), segmenters, test, n=8, batch_size=4,
                                      references=brain_references(tiny_cache))
    assert result["brain_like"]["mean"] == 0.5 and result["brain_like"]["n"] == 8
    assert result["samples"]["n"] == 4 and result["all_samples"]["n"] == 8
    # the painted brains' lesions are all counted, the noise fields' lesion-like voxels are not
    alone = validity.sample_validity(BlobModel(painted[:4]), segmenters, test, n=4, batch_size=4)
    assert result["samples"]["lesion_voxels"] == alone["samples"]["lesion_voxels"]


class PaintedStage:
    """A 'second stage' whose draws index the painted slices (decoded by PaintedModel)."""

    detail = None  # no detail model: its draws are decoded by the model alone

    def __init__(self, count: int) -> None:
        self.count, self.drawn = count, 0

    def draw(self, n: int, temperature: float = 1.0) -> list[torch.Tensor]:
        idx = (self.drawn + torch.arange(n)) % self.count
        self.drawn += n
        return [idx.float()]


class PaintedModel(BlobModel):
    """Prior draws: noise fields; second-stage draws: slices with lesions in the ventricles."""

    def __init__(self, painted: np.ndarray) -> None:
        super().__init__(painted)
        self.noise = torch.randn(len(painted), *painted.shape[1:]) * 2

    def sample(self, n: int, temperature: float = 1.0, size=None) -> SimpleNamespace:
        return SimpleNamespace(x_mean=self.noise[torch.arange(n) % len(self.noise)][:, None])

    def from_residuals(self, r: list[torch.Tensor], size) -> SimpleNamespace:
        return SimpleNamespace(x_mean=self.images[r[0].long()][:, None])


def painted_validity(segmenters, tiny_cache) -> tuple:
    """scored_validity of 4 noise-field prior samples and 4 painted second-stage draws, with the
    painted slices and the test split."""
    test = tiny_cache.split("test")
    painted = blobs_in_ventricles(test)
    scored = validity.scored_validity(
        PaintedModel(painted[:4]), segmenters, test, 4, 1.0, 0, 4,
        brain_references(tiny_cache), PaintedStage(4))
    return scored, painted, test


def test_second_stage_draws_are_scored_like_the_priors(segmenters, tiny_cache):
    (result, _, drawn, _), painted, test = painted_validity(segmenters, tiny_cache)
    np.testing.assert_array_equal(drawn.images, painted[:4])  # the draws scored are the figure's
    assert result["brain_like"]["mean"] == 0.0  # the prior's noise fields: none counted
    staged = result["second_stage"]
    alone = validity.sample_validity(BlobModel(painted[:4]), segmenters, test, n=4, batch_size=4)
    assert staged["brain_like"]["mean"] == 1.0 and staged["samples"]["n"] == 4
    assert staged["samples"]["lesion_voxels"] == alone["samples"]["lesion_voxels"]
    assert staged["samples"]["invalid_fraction"] == alone["samples"]["invalid_fraction"]


def test_sample_validity_is_seeded_and_reads_a_real_model(segmenters, tiny_run, tiny_cache):
    model = load_trained(tiny_run)[0]
    test = tiny_cache.split("test")
    a = validity.sample_validity(model, segmenters, test, n=6, seed=3)
    b = validity.sample_validity(model, segmenters, test, n=6, seed=3)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert a["seed"] == 3 and a["samples"]["n"] == 6
    with pytest.raises(PathanatError, match="temperature"):
        validity.sample_validity(model, segmenters, test, n=6, temperature=0.0)


def test_validity_run_writes_result_and_figure(segmenters, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = validity.validity_run(run, n=8, seed=1, progress=False)
    on_disk = json.loads((run / validity.VALIDITY_JSON).read_text())
    assert on_disk == result
    assert on_disk["model"] == "nvmp" and on_disk["all_samples"]["n"] == 8
    # only the brain-like samples are counted (a 6-step model draws few or none)
    shape = on_disk["brain_like"]
    assert shape["n"] == 8 and on_disk["samples"]["n"] == round(shape["mean"] * 8)
    staged = on_disk["second_stage"]  # the second-stage prior's 8 draws, counted the same way
    assert staged["brain_like"]["n"] == 8
    assert staged["samples"]["n"] == round(staged["brain_like"]["mean"] * 8)
    assert on_disk["invalid_labels"] == ["background", "CSF", "ventricles"]
    assert on_disk["segmenters"]["file"] == str(segmenters.path)
    assert on_disk["segmenters"]["lesion_dice"] == pytest.approx(segmenters.accuracy["lesion_dice"])
    assert set(on_disk["segmenters"]["tissue_dice"]) == {
        "background", "CSF", "ventricles", "GM", "WM", "hippocampus"}
    figure = run / validity.FIGURE
    assert figure.stat().st_size > 10_000
    caption = caption_path(figure).read_text()
    assert "cyan" in caption and "second-stage prior's first 8 draws" in caption


def test_figure_shows_a_row_of_second_stage_draws_where_there_are_any(segmenters, tiny_cache):
    (result, samples, drawn, real), _, _ = painted_validity(segmenters, tiny_cache)

    def titles(fig) -> list[str]:
        shown = [" ".join(t.get_text() for t in fig.texts)]  # the suptitle
        shown += [ax.get_title() for ax in fig.axes if ax.get_title()]
        plt.close(fig)
        return shown

    with_draws = titles(validity.validity_figure(result, samples, drawn, real, "nvae"))
    without = titles(validity.validity_figure(result, samples, None, real, "nvae"))
    assert "2nd-stage draws" in with_draws[0] and "2nd-stage" not in without[0]
    assert [t for t in with_draws if t.startswith("2nd-stage draw")] == [
        f"2nd-stage draw {i}" for i in range(4)]
    assert not any(t.startswith("2nd-stage") for t in without)
    assert sum(t.startswith("prior sample") for t in with_draws) == 4
    assert sum(t.startswith("real test") for t in with_draws) == validity.FIGURE_REAL


def test_validity_run_refuses_a_cache_without_lesions(tiny_run, tiny_cache, tmp_path,
                                                      monkeypatch):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache.path, copy, ignore=shutil.ignore_patterns(FOLDER))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["arrays"] = ["image", "brain", "dseg"]  # as an AD cache
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(runs, "run_cache", lambda folder, config: load_cache(copy))
    with pytest.raises(PathanatError, match="MS-only"):
        validity.validity_run(tiny_run, n=2, progress=False)
    assert not (tiny_run / validity.VALIDITY_JSON).exists()
