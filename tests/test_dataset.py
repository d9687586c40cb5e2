"""The torch Dataset and Lightning DataModule over a slice cache: items equal the cache arrays."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from pathanat.data.dataset import SliceDataModule, SliceDataset
from pathanat.data.prepare import load_cache, prepare_cohort
from pathanat.errors import ConfigError

SHAPE = (32, 32)
N_SLICES = 4


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory) -> Path:
    """Five subjects: a noisy box "brain", a lesion right of centre (a flip moves it), a dseg."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    for i in range(5):
        anat = root / f"sub-{i}" / "anat"
        anat.mkdir(parents=True)
        brain = np.zeros((48, 56, 12), np.uint8)
        brain[6:42, 8:48, 1:11] = 1
        lesion = np.zeros_like(brain)
        lesion[30:38, 20:26, 3:9] = 1
        image = (brain * (100 + 10 * i) + lesion * 50 + rng.normal(0, 5, brain.shape))
        dseg = brain * 4 - lesion * 1  # WM 4, lesion voxels 3 (any label map will do)
        for data, name in ((image.astype(np.float32), "FLAIR"), (brain, "desc-brain_mask"),
                           (lesion, "label-lesion_mask"), (dseg.astype(np.uint8), "dseg")):
            nib.save(nib.Nifti1Image(data, np.eye(4)), anat / f"sub-{i}_{name}.nii")
    pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(5)],
                  "volume_ml": [1.5, 2.0, "n/a", 3.0, 4.5],
                  "site": list("abcab")}).to_csv(root / "participants.tsv", sep="\t", index=False)
    return prepare_cohort(root, tmp_path_factory.mktemp("c") / "cache", shape=SHAPE,
                          n_slices=N_SLICES, progress=False, workers=1)


def test_items_match_the_cache_arrays(cache_path):
    cache = load_cache(cache_path)
    for split in ("train", "val", "test"):
        part = cache.split(split)
        ds = SliceDataset(cache_path, split)
        assert len(ds) == len(part) == len(cache.manifest["splits"][split]) * N_SLICES
        assert ds.attribute_names == ["volume_ml"]
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"].shape == (1, *SHAPE) and item["image"].dtype == torch.float32
            np.testing.assert_array_equal(item["image"][0].numpy(), part.image[i])
            np.testing.assert_array_equal(item["brain"][0].numpy(), part.brain[i])
            np.testing.assert_array_equal(item["lesion"][0].numpy(), part.lesion[i])
            np.testing.assert_array_equal(item["dseg"].numpy(), part.dseg[i])
            assert item["dseg"].dtype == torch.int64
            row = part.slices.iloc[i]
            assert (item["subject"], item["slice"]) == (row["subject"], row["slice"])
            np.testing.assert_array_equal(item["attributes"].numpy(),
                                          np.float32([row["volume_ml"]]))
    # The subject without a value carries NaN rather than a made-up number.
    missing = SliceDataset(cache_path, cache.manifest["subjects"]["sub-2"]["split"])
    assert any(torch.isnan(missing[i]["attributes"]).all() for i in range(len(missing)))


def test_two_workers_load_every_slice_once(cache_path):
    ds = SliceDataset(cache_path, "train")
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    images = torch.cat([b["image"] for b in batches])
    np.testing.assert_array_equal(images[:, 0].numpy(), load_cache(cache_path).split("train").image)
    assert [s for b in batches for s in b["subject"]] == ds.subjects


def test_flip_keeps_image_and_masks_aligned(cache_path):
    plain = SliceDataset(cache_path, "train")
    flipped = SliceDataset(cache_path, "train", flip_prob=1.0)
    i = int(np.argmax([plain[k]["lesion"].sum() for k in range(len(plain))]))
    a, b = plain[i], flipped[i]
    assert not torch.equal(a["lesion"], a["lesion"].flip(-2))  # the lesion is not symmetric
    for key in ("image", "brain", "lesion"):
        assert torch.equal(b[key], a[key].flip(-2))  # left-right is the RAS x axis
    assert torch.equal(b["dseg"], a["dseg"].flip(0))
    # With p = 0.5 each item is either wholly flipped or wholly not, and both happen.
    half = SliceDataset(cache_path, "train", flip_prob=0.5)
    torch.manual_seed(0)
    states = set()
    for _ in range(20):
        c = half[i]
        state = torch.equal(c["image"], b["image"])
        assert torch.equal(c["image"], (b if state else a)["image"])
        for key in ("brain", "lesion", "dseg"):
            assert torch.equal(c[key], (b if state else a)[key])
        states.add(state)
    assert states == {True, False}


def test_intensity_scaling_scales_the_image_only(cache_path):
    plain = SliceDataset(cache_path, "train")
    scaled = SliceDataset(cache_path, "train", intensity_scale=0.1)
    torch.manual_seed(0)
    a, b = plain[0], scaled[0]
    nonzero = a["image"].abs() > 1e-3
    ratio = b["image"][nonzero] / a["image"][nonzero]
    assert torch.allclose(ratio, ratio[0]) and 0.9 <= ratio[0] <= 1.1 and ratio[0] != 1
    assert torch.equal(a["lesion"], b["lesion"]) and torch.equal(a["brain"], b["brain"])


def test_datamodule_batches_and_no_augmentation_by_default(cache_path):
    dm = SliceDataModule(cache_path, batch_size=4, num_workers=0)
    assert dm.image_shape == (1, *SHAPE) and dm.attribute_names == ["volume_ml"]
    assert dm.has_lesion and dm.has_dseg
    dm.setup("fit")
    cache = load_cache(cache_path)
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader()),
                          ("test", dm.test_dataloader())):
        batches = list(loader)
        first = batches[0]
        assert first["image"].shape == (min(4, len(dm.datasets[split])), 1, *SHAPE)
        assert first["attributes"].shape == (first["image"].shape[0], 1)
        seen = torch.cat([b["image"] for b in batches])[:, 0].numpy()
        expected = cache.split(split).image
        # Shuffled (train) or not, the same slices come out unaltered: augmentation is off.
        assert sorted(s.tobytes() for s in seen) == sorted(s.tobytes() for s in expected)


def test_bad_settings_raise(cache_path):
    with pytest.raises(ConfigError, match="split"):
        SliceDataset(cache_path, "training")
    with pytest.raises(ConfigError, match="flip_prob"):
        SliceDataset(cache_path, "train", flip_prob=2.0)
    with pytest.raises(ConfigError, match="batch_size"):
        SliceDataModule(cache_path, batch_size=0)
