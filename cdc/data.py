"""Datasets: a registry of raw sources, the prepared on-disk format, and in-memory batching.

A prepared split is an `.npz` of `images` (uint8, N x C x H x W) and `labels` (int64): loadable without
pickle, hashable by DVC, and small enough (Fashion-MNIST: 55 MB) to hold in memory, which on a 2-core
machine is several times faster than a DataLoader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdc.device import to_device
from cdc.errors import InputError, reading


@dataclass
class Split:
    images: np.ndarray  # uint8, N x C x H x W
    labels: np.ndarray  # int64, N

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RawDataset:
    train: Split
    test: Split
    classes: list[str]


DatasetLoader = Callable[[Path], RawDataset]
DATASETS: dict[str, DatasetLoader] = {}
CLASS_COUNTS: dict[str, int] = {}  # known before any data is read: params are checked against them


def register_dataset(name: str, num_classes: int) -> Callable[[DatasetLoader], DatasetLoader]:
    def add(loader: DatasetLoader) -> DatasetLoader:
        DATASETS[name] = loader
        CLASS_COUNTS[name] = num_classes
        return loader

    return add


def load_raw(name: str, root: Path) -> RawDataset:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root)


def _torchvision_split(dataset: object) -> Split:
    data = np.asarray(dataset.data)  # type: ignore[attr-defined]
    images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    return Split(np.ascontiguousarray(images, dtype=np.uint8), np.asarray(dataset.targets, dtype=np.int64))  # type: ignore[attr-defined]


def _missing(name: str, where: Path, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"{name} not found under {where}. {how}")


@register_dataset("fashion_mnist", 10)
def fashion_mnist(root: Path) -> RawDataset:
    from torchvision.datasets import FashionMNIST

    raw = root / "FashionMNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte").exists():
        raise _missing(
            "Fashion-MNIST",
            raw,
            "Run `make data` (it installs Debian's dataset-fashion-mnist and gunzips "
            "/usr/share/datasets/fashion-mnist/*.gz there).",
        )
    train, test = (FashionMNIST(str(root), train=t, download=False) for t in (True, False))
    return RawDataset(_torchvision_split(train), _torchvision_split(test), list(train.classes))


def _cifar(cls_name: str, folder: str) -> DatasetLoader:
    def load(root: Path) -> RawDataset:
        import torchvision.datasets as tvd

        if not (root / folder).exists():
            raise _missing(
                cls_name, root / folder, "Place the torchvision copy there (no download happens at run time)."
            )
        cls = getattr(tvd, cls_name)
        train, test = (cls(str(root), train=t, download=False) for t in (True, False))
        return RawDataset(_torchvision_split(train), _torchvision_split(test), list(train.classes))

    return load


register_dataset("cifar10", 10)(_cifar("CIFAR10", "cifar-10-batches-py"))
register_dataset("cifar100", 100)(_cifar("CIFAR100", "cifar-100-python"))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of indices into (train, validation), each sorted."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` indices with classes balanced (for tiny test profiles); all when limit is None."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    keep, _ = stratified_split(labels, 1.0 - limit / len(labels), seed)
    return keep


def save_split(path: Path, split: Split) -> None:
    np.savez(path, images=split.images, labels=split.labels)


def load_split(path: Path) -> Split:
    with reading(path, "prepared split (.npz of images and labels)"), np.load(path, allow_pickle=False) as z:
        split = Split(z["images"], z["labels"].astype(np.int64))
    if split.images.ndim != 4 or split.images.dtype != np.uint8 or len(split.images) != len(split.labels):
        raise InputError(
            f"{path}: expected uint8 images N x C x H x W and N labels, got {split.images.dtype} "
            f"{split.images.shape} and {split.labels.shape}",
            path,
        )
    return split


def check_classes(split: Split, classes: list[str], where: str, every_class: bool) -> None:
    """Refuse labels outside the class list, a single class, and (training split) a class with no image:
    every later stage needs two classes or more and statistics for each."""
    k = len(classes)
    if len(classes) < 2:
        raise InputError(f"{where}: a single class {classes}; classification needs two or more")
    if len(split) and (split.labels.min() < 0 or split.labels.max() >= k):
        raise InputError(f"{where}: labels outside 0..{k - 1} (the {k} classes of meta.json)")
    missing = sorted(set(range(k)) - set(np.unique(split.labels).tolist()))
    if every_class and missing:
        names = ", ".join(repr(classes[c]) for c in missing)
        raise InputError(f"{where}: no image of class {names}; every class needs training images")


class Batches:
    """Normalized float batches from an in-memory split, optionally shuffled and augmented.

    Augmentation (method §6): pad 4 (scaled to the image size), random crop, horizontal flip.
    On a GPU `device`, the uint8 batch is copied through pinned memory and augmented and normalized
    there; the random draws stay on the CPU generator, so every device sees the same crops and flips.
    """

    def __init__(
        self,
        split: Split,
        mean: list[float],
        std: list[float],
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        hflip: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.images = torch.from_numpy(split.images)
        self.labels = torch.from_numpy(split.labels)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.batch_size, self.shuffle, self.augment, self.hflip = batch_size, shuffle, augment, hflip
        self.generator = torch.Generator().manual_seed(seed)
        self.pad = max(1, round(4 * split.images.shape[-1] / 32))

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))  # raw pixels: the border is black
        dy = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None].to(x.device)  # n x h x 1
        cols = (dx[:, None] + torch.arange(w))[:, None, :].to(x.device)  # n x 1 x w
        images = torch.arange(n, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[images, rows, cols].permute(0, 3, 1, 2)
        if self.hflip:
            flip = (torch.rand(n, generator=self.generator) < 0.5).to(x.device)
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out.contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = to_device(self.images[idx], self.device)
            if self.augment:
                x = self._augment(x)
            yield self._normalize(x), to_device(self.labels[idx], self.device)


@dataclass
class Prepared:
    """A prepared dataset directory: train/val/test splits plus `meta.json` (classes, shape, mean, std)."""

    train: Split
    val: Split
    test: Split
    meta: dict

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["input_shape"])  # type: ignore[return-value]

    def batches(self, split: str, batch_size: int, **kwargs: object) -> Batches:
        return Batches(getattr(self, split), self.meta["mean"], self.meta["std"], batch_size, **kwargs)  # type: ignore[arg-type]

    def training_batches(
        self, batch_size: int, seed: int, device: torch.device, augment: bool, hflip: bool
    ) -> Batches:
        """What a training epoch iterates: the training split shuffled, optionally augmented."""
        return self.batches(
            "train", batch_size, shuffle=True, augment=augment, hflip=hflip, seed=seed, device=device
        )


META_KEYS = ("classes", "input_shape", "mean", "std")


def load_prepared(root: Path) -> Prepared:
    """The prepared dataset at `root`, checked: metadata, the three splits, their shapes and classes."""
    import json

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no prepared dataset there; run `cdc prepare` first", root)
    meta_path = root / "meta.json"
    with reading(meta_path, "prepared dataset metadata"):
        meta = json.loads(meta_path.read_text())
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise InputError(f"{meta_path}: keys {missing} missing; rerun `cdc prepare`", meta_path)
    splits = {}
    for name in ("train", "val", "test"):
        path = root / f"{name}.npz"
        if not path.exists():
            raise InputError(f"{root}: split {name} missing ({path.name}); rerun `cdc prepare`", path)
        splits[name] = load_split(path)
        if list(splits[name].images.shape[1:]) != list(meta["input_shape"]):
            raise InputError(
                f"{path}: images of shape {list(splits[name].images.shape[1:])}, meta.json says "
                f"{meta['input_shape']}; rerun `cdc prepare`",
                path,
            )
        check_classes(splits[name], meta["classes"], str(path), every_class=name == "train")
    return Prepared(splits["train"], splits["val"], splits["test"], meta)


def channel_mean_std(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], in float64."""
    x = images.astype(np.float64) / 255.0
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()
