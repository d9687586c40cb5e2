import json
import shutil

import numpy as np
import pytest
import torch

from pathanat.data.prepare import load_cache
from pathanat.errors import InputError
from pathanat.evaluation import segmenters as seg
from pathanat.runs import load_trained, run_cache

# Brief training on the tiny phantom (24 train slices of 48 x 48 at 4 mm): ~20 s on one core.
TEST_STEPS = 400


@pytest.fixture(scope="module")
def tiny_cache(tiny_run):
    return run_cache(tiny_run, load_trained(tiny_run)[1])


@pytest.fixture(scope="module")
def trained(tiny_cache):
    # Saved into the tiny cache: test_validity.py then reuses them instead of training again.
    return seg.cohort_segmenters(tiny_cache, steps=TEST_STEPS)


def state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_segnet_any_size_and_small():
    net = seg.SegNet(6).eval()
    assert 5_000 < sum(p.numel() for p in net.parameters()) < 100_000
    with torch.no_grad():
        assert net(torch.randn(2, 1, 45, 38)).shape == (2, 6, 45, 38)


def test_segmenters_beat_trivial_baselines(trained, tiny_cache):
    test = tiny_cache.split("test")
    labels, probs = seg.segment(trained, np.asarray(test.image))
    dseg = np.asarray(test.dseg)
    truth = np.asarray(test.lesion).astype(bool)
    majority = np.bincount(dseg.ravel()).max() / dseg.size  # ~0.55: all background
    accuracy = (labels == dseg).mean()
    assert accuracy > majority + 0.25
    # Dice computed here from the masks, independently of segmenter_accuracy; measured after
    # 400 steps (one thread): GM 0.89, WM 0.87, lesion 0.49; tissue accuracy 0.93.
    for k in (3, 4):  # GM, WM
        both = ((labels == k) & (dseg == k)).sum()
        assert 2 * both / ((labels == k).sum() + (dseg == k).sum()) > 0.6
    found = probs > 0.5
    assert truth.any()
    lesion_dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert lesion_dice > 0.3  # the trivial "no lesion" answer scores 0
    assert trained.accuracy["lesion_dice"] == pytest.approx(lesion_dice)
    assert trained.accuracy["tissue_accuracy"] == pytest.approx(accuracy)


def test_training_is_deterministic(tiny_cache):
    a = seg.train_segmenters(tiny_cache, steps=3, seed=5)
    b = seg.train_segmenters(tiny_cache, steps=3, seed=5)
    c = seg.train_segmenters(tiny_cache, steps=3, seed=6)
    assert same_state(a.tissue.state_dict(), b.tissue.state_dict())
    assert same_state(a.lesion.state_dict(), b.lesion.state_dict())
    assert not same_state(a.lesion.state_dict(), c.lesion.state_dict())


def test_save_load_round_trip_is_bit_identical(tiny_cache, tmp_path):
    segs = seg.train_segmenters(tiny_cache, steps=2)
    path = seg.save_segmenters(segs, tmp_path / "segs")
    raw = torch.load(path, weights_only=True)  # tensors and plain types only
    assert raw["manifest_sha256"] == seg.manifest_sha256(tiny_cache)
    back = seg.load_segmenters(path)
    assert same_state(segs.tissue.state_dict(), back.tissue.state_dict())
    assert same_state(segs.lesion.state_dict(), back.lesion.state_dict())
    images = np.asarray(tiny_cache.split("test").image)
    for x, y in zip(seg.segment(segs, images), seg.segment(back, images), strict=True):
        np.testing.assert_array_equal(x, y)
    accuracy = json.loads((tmp_path / "segs" / seg.ACCURACY).read_text())
    assert accuracy["lesion_dice"] == pytest.approx(segs.accuracy["lesion_dice"])


def test_reused_while_manifest_unchanged_retrained_when_it_changes(
    trained, tiny_cache, tmp_path, monkeypatch
):
    calls = []
    real_train = seg.train_segmenters

    def counting(cache, **kwargs):
        calls.append(cache.path)
        return real_train(cache, **kwargs)

    monkeypatch.setattr(seg, "train_segmenters", counting)
    again = seg.cohort_segmenters(tiny_cache, steps=2)
    assert calls == []
    assert same_state(again.lesion.state_dict(), trained.lesion.state_dict())

    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["parameters"]["seed"] += 1  # as if the cohort had been prepared again
    (copy / "manifest.json").write_text(json.dumps(manifest))
    changed = load_cache(copy)
    fresh = seg.cohort_segmenters(changed, steps=2)
    assert calls == [copy]
    assert fresh.manifest_sha256 == seg.manifest_sha256(changed) != trained.manifest_sha256
    assert seg.load_segmenters(copy / seg.FOLDER / seg.WEIGHTS).manifest_sha256 == (
        fresh.manifest_sha256
    )
    seg.cohort_segmenters(changed, steps=2)
    assert calls == [copy]


def test_planted_blobs_are_marked_where_they_brighten():
    gen = torch.Generator().manual_seed(0)
    image = torch.full((200, 40, 40), -1.0)
    brain = torch.zeros(200, 40, 40, dtype=torch.bool)
    brain[:, 10:30, 10:30] = True
    fluid = torch.zeros_like(brain)
    fluid[:, 18:22, 18:22] = True
    out, mask = seg.planted_blobs(image, brain, fluid, pixel_mm=1.0, gen=gen)
    assert mask.any() and not mask.all()
    # A blob voxel (occupancy > 0.5) is blended at least half way to an intensity >= 0.8;
    # blending only ever brightens this dark image.
    assert (out[mask] > -1.0 + 0.5 * 1.8 - 1e-5).all()
    assert (out >= -1.0).all()
    # Centres: 40% in the fluid pool, 40% in the brain, 20% anywhere (1/4 of the image is brain).
    share = mask.float().sum(0)
    in_fluid = share[18:22, 18:22].mean() / share.mean()
    assert in_fluid > 5  # 16 pixels hold 40% of the centres (blobs spill over: measured 9.7)
    in_brain = share[10:30, 10:30].sum() / share.sum()
    assert 0.65 < in_brain < 0.95  # 0.85 of the centres; blobs spill over the edge: 0.74


def test_cache_without_masks_is_refused(tiny_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache.path, copy, ignore=shutil.ignore_patterns(seg.FOLDER))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["arrays"] = ["image", "brain", "dseg"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="no lesion"):
        seg.cohort_segmenters(load_cache(copy), steps=1)
