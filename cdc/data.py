"""The prepared dataset: its on-disk format, and batching from memory or from image files.

A small dataset is prepared as `.npz` splits of `images` (uint8, N x C x H x W) and `labels` (int64):
loadable without pickle, hashable by DVC, and small enough (Fashion-MNIST: 55 MB) to hold in memory,
which on a 2-core machine is several times faster than a DataLoader. A large image-file dataset is
prepared as the list of its files (`files.parquet`: file, label, split, md5) and streamed through a
DataLoader (cdc/images.py). Raw datasets and their registry: cdc/sources.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdc import distributed
from cdc.device import to_device
from cdc.errors import InputError, reading
from cdc.images import FileSplit, StreamBatches, decode, eval_transform


@dataclass
class Split:
    images: np.ndarray  # uint8, N x C x H x W
    labels: np.ndarray  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(self.images[idx], self.labels[idx])


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
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.device = torch.device(device)
        self.rank, self.world = shard
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

    def _augment(self, x: torch.Tensor, n: int, mine: slice) -> torch.Tensor:
        """Crops and flips drawn for all `n` images of the global batch (the same draws on every rank
        and in a one-process run), applied to this rank's `mine` of them, `x`."""
        _, _, h, w = x.shape
        p = self.pad
        dy = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)[mine]
        dx = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)[mine]
        padded = torch.nn.functional.pad(x, (p, p, p, p))  # raw pixels: the border is black
        rows = (dy[:, None] + torch.arange(h))[:, :, None].to(x.device)  # n x h x 1
        cols = (dx[:, None] + torch.arange(w))[:, None, :].to(x.device)  # n x 1 x w
        images = torch.arange(len(x), device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[images, rows, cols].permute(0, 3, 1, 2)
        if self.hflip:
            flip = (torch.rand(n, generator=self.generator)[mine] < 0.5).to(x.device)
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out.contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Global batches of `batch_size` images; with `shard=(rank, world)` each process takes every
        world-th image of each, so the processes together see exactly the one-process batches."""
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        mine = slice(self.rank, None, self.world)
        for start in range(0, n, self.batch_size):
            batch = order[start : start + self.batch_size]
            idx = batch[mine]
            x = to_device(self.images[idx], self.device)
            if self.augment:
                x = self._augment(x, len(batch), mine)
            yield self._normalize(x), to_device(self.labels[idx], self.device)


AnySplit = Split | FileSplit
AnyBatches = Batches | StreamBatches


@dataclass
class Prepared:
    """A prepared dataset: train/val/test splits (in memory, or image files streamed from `meta["root"]`)
    plus `meta.json` (classes, input shape, mean, std, storage)."""

    train: AnySplit
    val: AnySplit
    test: AnySplit
    meta: dict
    workers: int = 2  # DataLoader workers decoding image files (file-backed splits only)

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["input_shape"])  # type: ignore[return-value]

    def batches(self, split: str | AnySplit, batch_size: int, **kwargs: object) -> AnyBatches:
        """Batches of a split (by name, or a subset of one) through memory or a DataLoader, alike:
        (normalized float images, labels) on `device`, shuffled/augmented/sharded as asked."""
        data = getattr(self, split) if isinstance(split, str) else split
        mean, std = self.meta["mean"], self.meta["std"]
        kwargs.setdefault("shard", distributed.current().shard)  # launched by torchrun: this rank's share
        if isinstance(data, FileSplit):
            size = self.input_shape[-1]
            return StreamBatches(data, mean, std, batch_size, size, workers=self.workers, **kwargs)  # type: ignore[arg-type]
        return Batches(data, mean, std, batch_size, **kwargs)  # type: ignore[arg-type]

    def training_batches(
        self,
        batch_size: int,
        seed: int,
        device: torch.device,
        augment: bool,
        hflip: bool,
        shard: tuple[int, int] | None = None,
    ) -> AnyBatches:
        """What a training epoch iterates: the training split shuffled, optionally augmented; this
        torchrun rank's share unless `shard` says otherwise."""
        kwargs = {} if shard is None else {"shard": shard}
        return self.batches(
            "train",
            batch_size,
            shuffle=True,
            augment=augment,
            hflip=hflip,
            seed=seed,
            device=device,
            **kwargs,
        )

    def images(self, split: str, n: int) -> np.ndarray:
        """The first `n` images of a split as uint8 N x C x H x W, as evaluation sees them."""
        data = getattr(self, split)
        if isinstance(data, FileSplit):
            crop = eval_transform(self.input_shape[-1])
            return np.stack([crop(decode(data.root / f)).numpy() for f in data.files[:n]])
        return data.images[:n]


META_KEYS = ("classes", "input_shape", "mean", "std")
SPLITS = ("train", "val", "test")
FILES_TABLE = "files.parquet"  # file-backed splits: file (relative to meta["root"]), label, split, md5
# a file-backed dataset whose images were copied inside it (`cdc prepare --embed-files`): meta[EMBEDDED]
# is true and the files lie under <prepared>/EMBEDDED_DIR instead of meta["root"]
EMBEDDED, EMBEDDED_DIR = "files_embedded", "files"


def load_prepared(root: Path, workers: int = 2) -> Prepared:
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
    streamed = meta.get("storage") == "files"
    if streamed:
        splits = _file_splits(root, meta)
    else:
        splits = {}
        for name in SPLITS:
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
    for name in SPLITS:  # the file the split's labels come from
        where = f"{root / FILES_TABLE} ({name} split)" if streamed else str(root / f"{name}.npz")
        check_classes(splits[name], meta["classes"], where, every_class=name == "train")
    return Prepared(splits["train"], splits["val"], splits["test"], meta, workers)


def _file_splits(root: Path, meta: dict) -> dict[str, FileSplit]:
    """The file lists of a file-backed prepared dataset, each file checked to exist under meta's root."""
    import pyarrow.parquet as pq

    table_path = root / FILES_TABLE
    with reading(table_path, "list of image files"):
        table = pq.read_table(table_path, columns=["file", "label", "split"]).to_pydict()
    images = root / EMBEDDED_DIR if meta.get(EMBEDDED) else Path(meta["root"])
    absent = [f for f in table["file"] if not (images / f).is_file()]
    if absent:
        raise InputError(
            f"{images / absent[0]}: image missing ({len(absent)} of the {len(table['file'])} files listed in "
            f"{table_path} are); restore the tree or rerun `cdc prepare`",
            images / absent[0],
        )
    labels = np.asarray(table["label"], np.int64)
    split_of = np.asarray(table["split"])
    files = np.asarray(table["file"], dtype=object)
    out = {}
    for name in SPLITS:
        mask = split_of == name
        out[name] = FileSplit(images, files[mask].tolist(), labels[mask])
    return out


def channel_mean_std(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], in float64."""
    x = images.astype(np.float64) / 255.0
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()
