"""Torch access to a slice cache: a Dataset over one split and a Lightning DataModule.

An item is a dict:
    image       float32 (1, NX, NY), standardised
    brain       float32 (1, NX, NY), 0/1
    lesion      float32 (1, NX, NY), 0/1           (only when the cache has lesion masks)
    dseg        int64 (NX, NY) tissue labels        (only when the cache has dsegs)
    subject     str
    slice       int, index k of the subject's prepared grid
    attributes  float32 (A,), the cache's numeric attributes in ``attribute_names`` order, NaN
                where missing
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pathanat.data.prepare import SPLITS, load_cache
from pathanat.errors import ConfigError


class SliceDataset(Dataset):
    """The slices of one split, read from memory-mapped arrays.

    Each worker process opens its own memory maps on first use (a pickled memmap would be copied
    whole into every worker). ``flip_prob`` flips left-right (the RAS x axis) the image and every
    mask together; ``intensity_scale`` s multiplies the image by a factor drawn from U(1-s, 1+s).
    Both are 0 (off) by default.
    """

    def __init__(
        self,
        cache: str | Path,
        split: str,
        flip_prob: float = 0.0,
        intensity_scale: float = 0.0,
    ):
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}; got {split!r}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ConfigError(f"flip_prob must be in [0, 1]; got {flip_prob!r}")
        if not 0.0 <= intensity_scale < 1.0:
            raise ConfigError(f"intensity_scale must be in [0, 1); got {intensity_scale!r}")
        self.cache_path = Path(cache)
        self.split = split
        self.flip_prob = flip_prob
        self.intensity_scale = intensity_scale
        cache_ = load_cache(self.cache_path)
        table = cache_.split(split).slices
        self.attribute_names = cache_.numeric_attributes
        self.has_lesion = cache_.has_lesion
        self.has_dseg = cache_.has_dseg
        self.subjects = table["subject"].astype(str).tolist()
        self.slice_index = table["slice"].astype(int).tolist()
        self.attributes = torch.tensor(
            table[self.attribute_names].to_numpy(dtype=np.float32).reshape(len(table), -1)
        )
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.subjects)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            part = load_cache(self.cache_path).split(self.split, mmap=True)
            kinds = ("image", "brain", "lesion", "dseg")
            self._arrays = {k: getattr(part, k) for k in kinds if getattr(part, k) is not None}
        return self._arrays

    def __getitem__(self, index: int) -> dict:
        arrays = self._open()
        image = torch.from_numpy(np.array(arrays["image"][index], dtype=np.float32))[None]
        item = {"image": image, "brain": _mask(arrays["brain"][index])}
        if "lesion" in arrays:
            item["lesion"] = _mask(arrays["lesion"][index])
        if "dseg" in arrays:
            item["dseg"] = torch.from_numpy(arrays["dseg"][index].astype(np.int64))
        if self.flip_prob > 0 and torch.rand(()) < self.flip_prob:
            # x (left-right) is axis -2 of both the (1, NX, NY) tensors and the (NX, NY) dseg.
            for key in ("image", "brain", "lesion"):
                if key in item:
                    item[key] = item[key].flip(-2)
            if "dseg" in item:
                item["dseg"] = item["dseg"].flip(-2)
        if self.intensity_scale > 0:
            factor = 1 + self.intensity_scale * (2 * torch.rand(()) - 1)
            item["image"] = item["image"] * factor
        item["subject"] = self.subjects[index]
        item["slice"] = self.slice_index[index]
        item["attributes"] = self.attributes[index]
        return item


def _mask(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32))[None]


class SliceDataModule(pl.LightningDataModule):
    """Train/val/test loaders over a slice cache; augmentation applies to the train split only."""

    def __init__(
        self,
        cache: str | Path,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        flip_prob: float = 0.0,
        intensity_scale: float = 0.0,
    ):
        super().__init__()
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}")
        if not (isinstance(num_workers, int) and num_workers >= 0):
            raise ConfigError(f"num_workers must be an integer >= 0; got {num_workers!r}")
        self.cache_path = Path(cache)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.flip_prob = flip_prob
        self.intensity_scale = intensity_scale
        self.cache = load_cache(self.cache_path)  # fails early on a missing or foreign cache
        self.image_shape = (1, *self.cache.shape)
        self.attribute_names = self.cache.numeric_attributes
        self.has_lesion = self.cache.has_lesion
        self.has_dseg = self.cache.has_dseg
        self.datasets: dict[str, SliceDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.datasets:
                augment = split == "train"
                self.datasets[split] = SliceDataset(
                    self.cache_path, split,
                    flip_prob=self.flip_prob if augment else 0.0,
                    intensity_scale=self.intensity_scale if augment else 0.0,
                )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
