"""Generated image-folder trees and CIFAR archives: what the dataset tests and bench/stream_stats.py read
(no dataset is downloaded). Each class has its own colour cast and stripe direction, so a small model
learns them in an epoch or two."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def class_image(rng: np.random.Generator, k: int, h: int, w: int) -> np.ndarray:
    """An RGB uint8 image of class k: noise, a colour cast on channel k % 3, stripes every k + 2 pixels."""
    img = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    img[..., k % 3] += 100
    stripes = (np.arange(w) % (k + 2) == 0) if k % 2 else (np.arange(h) % (k + 2) == 0)[:, None]
    return np.where(np.broadcast_to(stripes, (h, w))[..., None], 255, img).astype(np.uint8)


def make_image_tree(
    root: Path,
    classes: list[str],
    per_class: dict[str, int],
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> Path:
    """root/<split>/<class>/<i>.jpg|png for each split in `per_class` (images per class); odd images
    are PNG, every fifth grayscale, sizes vary around `size`: what a user's folder looks like."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = size[0] + int(rng.integers(0, 9)), size[1] + int(rng.integers(0, 9))
                img = Image.fromarray(class_image(rng, k, h, w))
                if i % 5 == 4:
                    img = img.convert("L")
                img.save(folder / (f"{i:05d}.png" if i % 2 else f"{i:05d}.jpg"))
    return root


def cifar_records(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, images N x 3 x 32 x 32) with every class present."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = np.stack([class_image(rng, int(k), 32, 32).transpose(2, 0, 1) for k in labels])
    return labels.astype(np.int64), images


def write_cifar10_binary(root: Path, per_batch: int = 20, seed: int = 0) -> list[str]:
    """cifar-10-binary.tar.gz with the standard member names and record layout; returns class names."""
    names = [f"class{k}" for k in range(10)]
    members = {"cifar-10-batches-bin/batches.meta.txt": ("\n".join(names) + "\n").encode()}
    for i, batch in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        labels, images = cifar_records(per_batch, 10, seed + i)
        rows = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(len(labels), -1)], 1)
        members[f"cifar-10-batches-bin/{batch}.bin"] = rows.tobytes()
    _tar(root / "cifar-10-binary.tar.gz", members)
    return names


def write_cifar100_python(root: Path, n_train: int = 400, n_test: int = 100, seed: int = 0) -> list[int]:
    """An extracted cifar-100-python/ (pickled dicts, as the standard archive holds); returns the
    fine -> coarse map it encodes (each fine class k in superclass k % 20, shuffled)."""
    rng = np.random.default_rng(seed)
    fine_to_coarse = rng.permutation(np.arange(100) % 20).tolist()
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "fine_label_names": [f"f{k}" for k in range(100)],
        "coarse_label_names": [f"c{g}" for g in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
    for split, n in (("train", n_train), ("test", n_test)):
        labels, images = cifar_records(n, 100, seed + n)
        batch = {
            "data": images.reshape(n, -1),
            "fine_labels": labels.tolist(),
            "coarse_labels": [fine_to_coarse[k] for k in labels],
        }
        (folder / split).write_bytes(pickle.dumps(batch))
    return fine_to_coarse


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
