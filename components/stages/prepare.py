"""Stage `prepare`: raw dataset -> seeded train/validation split + test set, and meta.json.

Arrays (and image-file datasets small enough, `data.storage`) become `.npz` splits held in memory by
the later stages; a large image-file dataset becomes `files.parquet`, the list of its files with label,
split and md5, streamed from `data.root` by the later stages (with `--embed-files`, as Kubeflow runs it,
from a copy of the tree inside the prepared dataset, so any machine or pod that has it can read
them). Either way an image-file dataset's list and
content hash are recorded, so a changed tree is a changed dataset.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cdc.data import (
    EMBEDDED,
    EMBEDDED_DIR,
    FILES_TABLE,
    AnySplit,
    Split,
    channel_mean_std,
    check_classes,
    save_split,
    stratified_split,
    stratified_subset,
)
from cdc.errors import InputError
from cdc.images import FileSplit, check_image, decode_all, file_md5
from cdc.io import atomic_path, write_json
from cdc.params import Params
from cdc.sources import DEFAULT_IMAGE_SIZE, load_raw
from components.progress import progress
from components.tracking import StageTracker

log = logging.getLogger(__name__)
NORMALIZATION_SAMPLE = 2000  # training images a streamed dataset's mean and std are estimated on
DECODE_WORKERS = min(4, os.cpu_count() or 1)


def run(
    params: Params,
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    tracker: StageTracker,
    embed_files: bool = False,
) -> None:
    p = params.data
    raw = load_raw(p.dataset, inputs["raw"])
    full = raw.train.subset(stratified_subset(raw.train.labels, p.train_limit, params.seed))
    splits: dict[str, AnySplit] = {}
    for name, given in (("val", raw.val), ("test", raw.test)):
        if given is not None:
            limit = p.test_limit if name == "test" else None
            splits[name] = given.subset(stratified_subset(given.labels, limit, params.seed))
            continue
        if p.val_size >= len(full):
            raise InputError(
                f"data.val_size={p.val_size} leaves no training images (only {len(full)} available)"
            )
        fit_idx, held_idx = stratified_split(full.labels, p.val_size / len(full), params.seed)
        splits[name] = full.subset(held_idx)  # without a test/ tree, the test split is held out too
        full = full.subset(fit_idx)
    splits = {"train": full, "val": splits["val"], "test": splits["test"]}
    for name, split in splits.items():
        check_classes(split, raw.classes, f"data.dataset {p.dataset} ({name} split)", name == "train")

    meta: dict = {"dataset": p.dataset, "classes": raw.classes}
    if raw.coarse is not None:
        meta["coarse"] = {
            "name": raw.coarse.name,
            "fine_to_coarse": raw.coarse.fine_to_coarse,
            "names": raw.coarse.names,
        }
    files = None
    if isinstance(full, FileSplit):
        size = p.image_size or DEFAULT_IMAGE_SIZE
        files = file_table(splits)  # type: ignore[arg-type]
        meta["content_md5"] = content_hash(files)
        meta["image_size"] = size
        decoded_mb = sum(len(s) for s in splits.values()) * 3 * size * size / 2**20
        in_memory = p.storage == "memory" or (p.storage == "auto" and decoded_mb <= p.memory_limit_mb)
        if in_memory:
            splits = {
                name: Split(decode_all(s, size, DECODE_WORKERS, _bar(f"decoding {name}", s)), s.labels)  # type: ignore[arg-type]
                for name, s in splits.items()
            }
        else:
            if embed_files:  # the tree travels inside the prepared dataset (Kubeflow: across pods)
                meta[EMBEDDED] = True
            else:
                meta["root"] = str(inputs["raw"])
            sample = full.subset(stratified_subset(full.labels, NORMALIZATION_SAMPLE, params.seed))
            images = decode_all(sample, size, DECODE_WORKERS, _bar("normalization sample", sample))
            meta["normalization_images"] = len(sample)
        log.info(
            "%d image files, %.0f MB decoded at %d px: %s",
            len(files["file"]),
            decoded_mb,
            size,
            "decoded into memory" if in_memory else "streamed from the tree",
        )
    streamed = isinstance(splits["train"], FileSplit)
    if not streamed:
        images = splits["train"].images  # type: ignore[union-attr]
    mean, std = channel_mean_std(images)
    if p.normalization is not None:  # the model's own (e.g. ImageNet's for torchvision weights)
        if len(p.normalization.mean) != len(mean):
            raise InputError(
                f"data.normalization gives {len(p.normalization.mean)} channels, the images have {len(mean)}"
            )
        mean, std = list(p.normalization.mean), list(p.normalization.std)
        meta["normalization"] = "data.normalization"
    if streamed:
        meta["storage"] = "files"
    meta.update(
        input_shape=[3, meta["image_size"], meta["image_size"]] if streamed else list(images.shape[1:]),
        mean=mean,
        std=std,
        sizes={name: len(s) for name, s in splits.items()},
    )
    with atomic_path(outputs["prepared"]) as tmp:
        tmp.mkdir()
        if files is not None:
            pq.write_table(pa.table(files), tmp / FILES_TABLE)
        if meta.get(EMBEDDED):
            embed(inputs["raw"], files["file"], tmp / EMBEDDED_DIR)  # type: ignore[index]
        if not streamed:
            for name, split in splits.items():
                save_split(tmp / f"{name}.npz", split)  # type: ignore[arg-type]
        write_json(tmp / "meta.json", meta)
    log.info("prepared %s (%s): %s", p.dataset, meta.get("storage", "memory"), meta["sizes"])
    tracker.log_metrics({f"{name}_images": len(s) for name, s in splits.items()})


def embed(root: Path, files: list[str], into: Path) -> None:
    """Copy the listed image files (hard links where the filesystem allows) under `into`."""
    for file in progress(files, f"copying image files into {into.parent.name}"):
        target = into / file
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(root / file, target)
        except OSError:
            shutil.copy2(root / file, target)


def _bar(desc: str, split: AnySplit):  # noqa: ANN202 - a progress wrapper for decode_all
    return lambda batches: progress(batches, desc, total=-(-len(split) // 256))


def file_table(splits: dict[str, FileSplit]) -> dict[str, list]:
    """file, label, split and md5 of every image, each header checked (a file that is not an image
    fails here, naming it, rather than in a DataLoader worker hours later)."""
    table: dict[str, list] = {"file": [], "label": [], "split": [], "md5": []}
    rows = [
        (name, s.root, f, k)
        for name, s in splits.items()
        for f, k in zip(s.files, s.labels.tolist(), strict=True)
    ]
    for name, root, file, label in progress(rows, "hashing image files"):
        check_image(root / file)
        table["file"].append(file)
        table["label"].append(label)
        table["split"].append(name)
        table["md5"].append(file_md5(root / file))
    return table


def content_hash(table: dict[str, list]) -> str:
    """One md5 over every (file, label, split, md5) row: equal iff the prepared dataset is the same."""
    digest = hashlib.md5()
    for row in zip(table["file"], table["label"], table["split"], table["md5"], strict=True):
        digest.update((",".join(map(str, row)) + "\n").encode())
    return digest.hexdigest()
