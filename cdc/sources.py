"""Raw datasets behind a registry: where the images of each split come from, before `prepare`.

Arrays for the small standard sets (Fashion-MNIST, CIFAR), read from their local files, never
downloaded; image files for `imagefolder`, a user's tree of one folder per class. A reader checks the
tree and names the path that is wrong (missing folder, empty class, classes that differ between splits).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdc.data import Split
from cdc.errors import InputError
from cdc.images import IMAGE_SUFFIXES, FileSplit
from cdc.registry import Registry


@dataclass
class CoarseClasses:
    """A dataset's own grouping of its classes (CIFAR-100's 20 superclasses)."""

    name: str
    fine_to_coarse: list[int]
    names: list[str]


@dataclass
class RawDataset:
    train: Split | FileSplit
    test: Split | FileSplit | None  # None: carved from train by `prepare`
    classes: list[str]
    val: Split | FileSplit | None = None  # None: carved from train by `prepare`
    coarse: CoarseClasses | None = None


@dataclass(frozen=True)
class DatasetSource:
    load: Callable[[Path], RawDataset]
    # known before any data is read, so params are checked against it; None: found in the data
    num_classes: int | None
    input_shape: tuple[int, int, int] | None = None  # channels, height, width (None: set by params)


DATASETS: Registry[DatasetSource] = Registry("dataset")
DEFAULT_IMAGE_SIZE = 224  # imagefolder with data.image_size null: the ImageNet convention
COARSE_MAPS = {"cifar100_superclasses": "cifar100"}  # score.coarse_map name -> the dataset that has it


def register_dataset(
    name: str, num_classes: int | None, input_shape: tuple[int, int, int] | None = None
) -> Callable[[Callable[[Path], RawDataset]], Callable[[Path], RawDataset]]:
    def add(load: Callable[[Path], RawDataset]) -> Callable[[Path], RawDataset]:
        DATASETS.add(name, DatasetSource(load, num_classes, input_shape))
        return load

    return add


def load_raw(name: str, root: Path) -> RawDataset:
    source = DATASETS.get(name)
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: data.root of dataset {name} not found", root)
    return source.load(root)


def _torchvision_split(dataset: object) -> Split:
    data = np.asarray(dataset.data)  # type: ignore[attr-defined]
    images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    return Split(np.ascontiguousarray(images, dtype=np.uint8), np.asarray(dataset.targets, dtype=np.int64))  # type: ignore[attr-defined]


@register_dataset("fashion_mnist", 10, (1, 28, 28))
def fashion_mnist(root: Path) -> RawDataset:
    from torchvision.datasets import FashionMNIST

    raw = root / "FashionMNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte").exists():
        raise InputError(
            f"Fashion-MNIST not found under {raw}. Run `make data` (it installs Debian's "
            "dataset-fashion-mnist and gunzips /usr/share/datasets/fashion-mnist/*.gz there).",
            raw,
        )
    train, test = (FashionMNIST(str(root), train=t, download=False) for t in (True, False))
    return RawDataset(_torchvision_split(train), _torchvision_split(test), list(train.classes))


# --- CIFAR: the binary or the python version, extracted or as the .tar.gz archive ---------------------


class _ArraysOnly(pickle.Unpickler):
    """The python-version CIFAR batches are pickles of dicts of lists and one ndarray: only the classes
    that rebuild those are allowed, so a tampered file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")


class _Files:
    """Members of an extracted CIFAR folder or of its .tar.gz, read as bytes by base name."""

    def __init__(self, root: Path, folder: str, archive: str) -> None:
        self.where = root / folder
        self.archive = root / archive
        self._members: dict[str, bytes] | None = None

    def exists(self) -> bool:
        return self.where.is_dir() or self.archive.is_file()

    def read(self, name: str) -> bytes:
        if self.where.is_dir():
            path = self.where / name
            if not path.exists():
                raise InputError(f"{path}: missing from the CIFAR folder", path)
            return path.read_bytes()
        if self._members is None:
            try:
                with tarfile.open(self.archive, "r:gz") as tar:
                    self._members = {
                        Path(m.name).name: tar.extractfile(m).read()  # type: ignore[union-attr]
                        for m in tar.getmembers()
                        if m.isfile()
                    }
            except (tarfile.TarError, OSError, EOFError) as err:
                raise InputError(
                    f"{self.archive}: not a readable CIFAR archive ({err})", self.archive
                ) from None
        if name not in self._members:
            raise InputError(f"{self.archive}: has no member {name}", self.archive)
        return self._members[name]


def _binary_records(data: bytes, label_bytes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (label bytes, 3072 pixel bytes): (labels N x label_bytes, images N x 3 x 32 x 32)."""
    width = label_bytes + 3 * 32 * 32
    if len(data) % width:
        raise InputError(f"{where}: {len(data)} bytes is not a whole number of {width}-byte CIFAR records")
    rows = np.frombuffer(data, np.uint8).reshape(-1, width)
    return rows[:, :label_bytes].astype(np.int64), rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy()


def _python_batch(data: bytes, where: str) -> dict:
    try:
        return _ArraysOnly(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise InputError(f"{where}: not a readable CIFAR python batch ({err})") from None


def _names(text: bytes) -> list[str]:
    return [line.strip() for line in text.decode().splitlines() if line.strip()]


def _cifar10(root: Path) -> RawDataset:
    binary = _Files(root, "cifar-10-batches-bin", "cifar-10-binary.tar.gz")
    python = _Files(root, "cifar-10-batches-py", "cifar-10-python.tar.gz")
    parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    splits = {}
    if binary.exists():
        classes = _names(binary.read("batches.meta.txt"))
        for split, names in parts.items():
            records = [_binary_records(binary.read(f"{n}.bin"), 1, f"{binary.where}/{n}.bin") for n in names]
            splits[split] = Split(
                np.concatenate([r[1] for r in records]), np.concatenate([r[0][:, 0] for r in records])
            )
    elif python.exists():
        classes = list(_python_batch(python.read("batches.meta"), str(python.where))["label_names"])
        for split, names in parts.items():
            batches = [_python_batch(python.read(n), f"{python.where}/{n}") for n in names]
            images = np.concatenate([np.asarray(b["data"], np.uint8).reshape(-1, 3, 32, 32) for b in batches])
            splits[split] = Split(
                images, np.concatenate([np.asarray(b["labels"], np.int64) for b in batches])
            )
    else:
        raise _cifar_missing(root, binary, python)
    return RawDataset(splits["train"], splits["test"], classes)


def _cifar100(root: Path) -> RawDataset:
    binary = _Files(root, "cifar-100-binary", "cifar-100-binary.tar.gz")
    python = _Files(root, "cifar-100-python", "cifar-100-python.tar.gz")
    splits, coarse_labels = {}, []
    if binary.exists():
        classes = _names(binary.read("fine_label_names.txt"))
        coarse_names = _names(binary.read("coarse_label_names.txt"))
        for split in ("train", "test"):
            labels, images = _binary_records(binary.read(f"{split}.bin"), 2, f"{binary.where}/{split}.bin")
            splits[split] = Split(images, labels[:, 1])
            coarse_labels.append(labels[:, 0])
    elif python.exists():
        meta = _python_batch(python.read("meta"), f"{python.where}/meta")
        classes, coarse_names = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
        for split in ("train", "test"):
            batch = _python_batch(python.read(split), f"{python.where}/{split}")
            images = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32)
            splits[split] = Split(images, np.asarray(batch["fine_labels"], np.int64))
            coarse_labels.append(np.asarray(batch["coarse_labels"], np.int64))
    else:
        raise _cifar_missing(root, binary, python)
    fine = np.concatenate([splits["train"].labels, splits["test"].labels])
    coarse = superclass_map(fine, np.concatenate(coarse_labels), len(classes), str(root))
    groups = CoarseClasses("cifar100_superclasses", coarse, coarse_names)
    return RawDataset(splits["train"], splits["test"], classes, coarse=groups)


def superclass_map(fine: np.ndarray, coarse: np.ndarray, n_classes: int, where: str) -> list[int]:
    """Fine class -> coarse class, read off images labelled with both; each fine class must have one."""
    pairs = np.unique(np.stack([fine, coarse], 1), axis=0)
    if len(pairs) != len(np.unique(pairs[:, 0])) or len(pairs) != n_classes:
        raise InputError(
            f"{where}: the coarse labels do not give each of the {n_classes} classes one superclass"
        )
    return pairs[np.argsort(pairs[:, 0]), 1].tolist()


def _cifar_missing(root: Path, *sources: _Files) -> InputError:
    looked = ", ".join(f"{s.where.name}/ or {s.archive.name}" for s in sources)
    return InputError(
        f"{root}: no CIFAR files there (looked for {looked}); place the standard archive there "
        "(no download happens at run time)",
        root,
    )


register_dataset("cifar10", 10, (3, 32, 32))(_cifar10)
register_dataset("cifar100", 100, (3, 32, 32))(_cifar100)


# --- imagefolder: root/train/<class>/*.jpg, optional root/val/ and root/test/ -------------------------


def _class_folders(tree: Path) -> dict[str, list[str]]:
    """Class name -> image files (relative to the tree's parent, sorted), checked not to be empty."""
    if not tree.is_dir():
        raise InputError(f"{tree}: not a folder of class folders", tree)
    folders = sorted(p for p in tree.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{tree}: no class folders (expected {tree}/<class>/<image>)", tree)
    found = {}
    for folder in folders:
        files = sorted(
            str(p.relative_to(tree.parent))
            for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise InputError(
                f"{folder}: class folder with no images (readable suffixes: {' '.join(IMAGE_SUFFIXES)})",
                folder,
            )
        found[folder.name] = files
    return found


@register_dataset("imagefolder", None)
def imagefolder(root: Path) -> RawDataset:
    """A user's tree: train/ (one folder per class, names sorted give the class order) and optional
    val/ and test/ trees with the same class folders."""
    if not (root / "train").is_dir():
        raise InputError(f"{root}: no train/ folder (expected {root}/train/<class>/<image>)", root)
    train = _class_folders(root / "train")
    classes = sorted(train)
    splits: dict[str, FileSplit | None] = {}
    for name in ("train", "val", "test"):
        tree = root / name
        if name != "train" and not tree.exists():
            splits[name] = None
            continue
        found = train if name == "train" else _class_folders(tree)
        if sorted(found) != classes:
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise InputError(
                f"{tree}: its class folders differ from {root / 'train'}'s (only in {name}/: {extra}; "
                f"missing from {name}/: {missing})",
                tree,
            )
        files = [f for c in classes for f in found[c]]
        labels = np.concatenate([np.full(len(found[c]), k, np.int64) for k, c in enumerate(classes)])
        splits[name] = FileSplit(root, files, labels)
    return RawDataset(splits["train"], splits["test"], classes, val=splits["val"])  # type: ignore[arg-type]
