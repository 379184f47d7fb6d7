"""Image files read as they are needed: a dataset too large for memory is a list of files, decoded by
DataLoader workers with `torchvision.transforms.v2` and batched like an in-memory split.

The evaluation transform (resize the shorter side, center crop) is also what `prepare` applies when it
decodes a small image dataset into memory, so the two paths give the same evaluation batches; training
augmentation follows the image size (pad-and-crop + flip for small images, as the in-memory batches
do; random-resized crop + flip for large ones).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:  # torchvision loads lazily: importing it costs every stage a second (its models)
    from torchvision.transforms import v2

from cdc.device import to_device
from cdc.errors import InputError

# what torchvision's ImageFolder reads; other files in a class folder are ignored
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# below this side, training augmentation is pad-and-crop (CIFAR-style); at or above, random-resized crop
LARGE_IMAGE_SIDE = 96


@dataclass
class FileSplit:
    """A split as image files under `root` (relative paths) and their labels."""

    root: Path
    files: list[str]
    labels: np.ndarray  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> FileSplit:
        return FileSplit(self.root, [self.files[i] for i in idx], self.labels[idx])


def decode(path: Path) -> torch.Tensor:
    """An image file as uint8 RGB, C x H x W; an InputError naming the file if it is not one."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(path) as img:
            return pil_to_tensor(img.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{path}: image not found (the tree changed since `cdc prepare`?)", path) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:120]
        raise InputError(f"{path}: not a readable image ({reason})", path) from None


def check_image(path: Path) -> None:
    """Open the file's header (no pixel decoding): catches files that are not images at all."""
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - the header is parsed lazily
    except (UnidentifiedImageError, OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:120]
        raise InputError(f"{path}: not a readable image ({reason})", path) from None


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def eval_transform(size: int) -> v2.Transform:
    """Resize the shorter side to `size`, then center crop `size` x `size` (uint8 in, uint8 out)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])


def train_transform(size: int, hflip: bool) -> v2.Transform:
    from torchvision.transforms import v2

    flip = [v2.RandomHorizontalFlip()] if hflip else []
    if size >= LARGE_IMAGE_SIDE:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), *flip])
    pad = max(1, round(4 * size / 32))  # as cdc.data.Batches pads in-memory images
    return v2.Compose([eval_transform(size), v2.RandomCrop(size, padding=pad, fill=0), *flip])


class ImageFiles(Dataset):
    """(uint8 image, label) pairs of a FileSplit, decoded and transformed on access.

    Indexed by (index, seed): the augmentation of an image draws from its own seed, so what a batch
    holds depends on the sampler's generator alone, not on how many workers decode it or which one.
    """

    def __init__(self, split: FileSplit, transform: v2.Transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, seed = key
        image = decode(self.split.root / self.split.files[i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), int(self.split.labels[i])


class _Order(Sampler[list[tuple[int, int]]]):
    """Batches of (index, augmentation seed) pairs for one epoch: global batches of `batch_size` in
    order (or shuffled by `generator`, which also draws the seeds), of which a rank takes every
    world-th pair, as cdc.data.Batches does."""

    def __init__(
        self, n: int, batch_size: int, shuffle: bool, generator: torch.Generator, shard: tuple[int, int]
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.generator = n, batch_size, shuffle, generator
        self.rank, self.world = shard

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=self.generator)
        pairs = list(zip(order.tolist(), seeds.tolist(), strict=True))
        for start in range(0, self.n, self.batch_size):
            yield pairs[start : start + self.batch_size][self.rank :: self.world]


class StreamBatches:
    """Normalized float batches of image files through a DataLoader (workers, pinned memory on CUDA).

    The epoch's order and every image's augmentation seed come from `generator` (as for in-memory
    batches): the same generator state gives the same batches, whatever the number of workers, so an
    epoch resumed from a checkpoint is redrawn exactly. `shard=(rank, world)` keeps every world-th
    image of each global batch, as cdc.data.Batches does.
    """

    def __init__(
        self,
        split: FileSplit,
        mean: list[float],
        std: list[float],
        batch_size: int,
        image_size: int,
        shuffle: bool = False,
        augment: bool = False,
        hflip: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        workers: int = 2,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.device = torch.device(device)
        self.labels = torch.from_numpy(split.labels)
        transform = train_transform(image_size, hflip) if augment else eval_transform(image_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(
            ImageFiles(split, transform),
            batch_sampler=_Order(len(split), batch_size, shuffle, self.generator, shard),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in worker_errors(self.loader):
            x = to_device(x, self.device)
            yield (x.float() / 255.0 - self.mean) / self.std, to_device(y, self.device)


def worker_errors(loader: DataLoader) -> Iterator:
    """The loader's batches; a worker's InputError (re-raised by DataLoader with the worker's traceback
    as text) becomes one again, with its one-line message."""
    try:
        yield from loader
    except InputError:
        raise
    except Exception as err:
        if "InputError" not in str(err):
            raise
        last = str(err).strip().splitlines()[-1].split(": ", 1)[-1]
        raise InputError(last) from None


def decode_all(
    split: FileSplit, image_size: int, workers: int, wrap: Callable[[Iterable], Iterable] = iter
) -> np.ndarray:
    """Every image of `split` through the evaluation transform, as uint8 N x 3 x size x size; `wrap`
    decorates the batch iterator (a progress bar)."""
    order = _Order(len(split), 256, False, torch.Generator(), (0, 1))
    loader = DataLoader(
        ImageFiles(split, eval_transform(image_size)), batch_sampler=order, num_workers=workers
    )
    out = np.empty((len(split), 3, image_size, image_size), np.uint8)
    start = 0
    for x, _ in wrap(worker_errors(loader)):
        out[start : start + len(x)] = x.numpy()
        start += len(x)
    return out
