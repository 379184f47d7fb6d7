"""Datasets beyond Fashion-MNIST: image-folder trees (in memory and streamed), CIFAR from its archives,
and the errors a bad tree gives. Trees and archives are generated (tests/image_tree.py)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cdc.data import FILES_TABLE, load_prepared
from cdc.errors import InputError
from cdc.images import FileSplit, StreamBatches
from cdc.params import Params, ParamsError, validate_params
from cdc.sources import load_raw
from components.cli import main
from components.stages.score import dataset_coarse_map
from tests.conftest import RAW
from tests.image_tree import make_image_tree, write_cifar10_binary, write_cifar100_python
from tests.workspace import TINY, make_workspace, run_ok

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("tree"), CLASSES, {"train": 24, "test": 6})


def prepare(tmp: Path, root: Path, monkeypatch: pytest.MonkeyPatch, **data: object) -> Path:
    """`cdc prepare` of `root` with these data params in `tmp`; the prepared folder."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    monkeypatch.delenv("CDC_PARENT_RUN_ID", raising=False)
    tmp.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp)
    params = {"data": {"dataset": "imagefolder", "root": str(root), "val_size": 9, "image_size": 32, **data}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert main(["prepare", "--prepared", "prepared"]) == 0  # --raw from data.root
    return tmp / "prepared"


@pytest.fixture(scope="module")
def both(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tree prepared into memory and as a streamed file list."""
    mp = pytest.MonkeyPatch()
    try:
        memory = prepare(tmp_path_factory.mktemp("memory"), tree, mp, storage="memory")
        files = prepare(tmp_path_factory.mktemp("files"), tree, mp, storage="files")
    finally:
        mp.undo()
    return memory, files


def test_imagefolder_classes_splits_and_file_list(both: tuple[Path, Path], tree: Path):
    memory, files = both
    for prepared in both:
        meta = json.loads((prepared / "meta.json").read_text())
        assert meta["classes"] == CLASSES and meta["input_shape"] == [3, 32, 32]
        assert meta["sizes"] == {"train": 63, "val": 9, "test": 18}  # val carved from train/, test/ given
        table = pq.read_table(prepared / FILES_TABLE).to_pydict()
        assert len(table["file"]) == 90 and set(table["split"]) == {"train", "val", "test"}
        assert all((tree / f).is_file() for f in table["file"])
        assert {
            f.split("/")[0] for f, s in zip(table["file"], table["split"], strict=True) if s == "test"
        } == {"test"}
        import hashlib

        first = tree / table["file"][0]
        assert table["md5"][0] == hashlib.md5(first.read_bytes()).hexdigest()
    assert (memory / "train.npz").exists() and not (files / "train.npz").exists()
    assert json.loads((files / "meta.json").read_text())["storage"] == "files"
    # one content hash for the same files, labels and splits
    hashes = {json.loads((p / "meta.json").read_text())["content_md5"] for p in both}
    assert len(hashes) == 1


def test_streamed_and_in_memory_give_the_same_evaluation_batches(both: tuple[Path, Path]):
    memory, files = (load_prepared(p, workers=w) for p, w in zip(both, (2, 2), strict=True))
    assert isinstance(files.train, FileSplit)
    assert memory.meta["mean"] == pytest.approx(files.meta["mean"], abs=1e-12)
    for split in ("train", "val", "test"):
        a = list(memory.batches(split, 16))
        b = list(files.batches(split, 16))
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_streamed_augmentation_depends_on_the_generator_only(both: tuple[Path, Path]):
    """The same seed gives the same augmented batches with 0 or 2 workers; another seed does not."""

    def epoch(workers: int, seed: int) -> list[torch.Tensor]:
        data = load_prepared(both[1], workers=workers)
        return [x for x, _ in data.training_batches(16, seed, torch.device("cpu"), True, True)]

    one, two, other = epoch(0, 3), epoch(2, 3), epoch(0, 4)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(one, other, strict=True))


@pytest.mark.parametrize("storage", ["memory", "files"])
def test_shards_together_are_the_one_process_batches(both: tuple[Path, Path], storage: str):
    """What torchrun ranks see: each global batch split between them, augmentation draws included."""
    data = load_prepared(both[0] if storage == "memory" else both[1], workers=0)

    def epoch(shard: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(data.training_batches(16, 5, torch.device("cpu"), True, True, shard=shard))

    whole, rank0, rank1 = epoch((0, 1)), epoch((0, 2)), epoch((1, 2))
    assert len(whole) == len(rank0) == len(rank1)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, rank0, rank1, strict=True):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def test_auto_storage_streams_above_the_memory_limit(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    prepared = prepare(tmp_path, tree, monkeypatch, memory_limit_mb=1)  # 90 images x 3 KB decoded
    assert not json.loads((prepared / "meta.json").read_text()).get("storage")
    prepared = prepare(tmp_path / "big", tree, monkeypatch, image_size=128, memory_limit_mb=1)  # x 48 KB
    assert json.loads((prepared / "meta.json").read_text())["storage"] == "files"


def test_a_changed_tree_is_a_changed_dataset(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    before = json.loads((prepare(tmp_path / "a", copy, monkeypatch) / "meta.json").read_text())
    image = next((copy / "train" / "bee").glob("*.png"))
    image.write_bytes((copy / "train" / "ant" / "00001.png").read_bytes())  # same size, other pixels
    after = json.loads((prepare(tmp_path / "b", copy, monkeypatch) / "meta.json").read_text())
    assert before["content_md5"] != after["content_md5"]


def _bad(tree: Path, tmp: Path, how: str) -> Path:
    bad = tmp / "bad"
    shutil.copytree(tree, bad)
    if how == "empty class":
        for f in (bad / "train" / "bee").iterdir():
            f.unlink()
        return bad / "train" / "bee"
    if how == "unreadable image":
        victim = bad / "train" / "cat" / "00003.png"
        victim.write_bytes(b"\x89PNG but not really")
        return victim
    if how == "classes differ":
        (bad / "test" / "cat").rename(bad / "test" / "cow")
        return bad / "test"
    if how == "no train folder":
        shutil.rmtree(bad / "train")
        return bad
    raise AssertionError(how)


@pytest.mark.parametrize("storage", ["memory", "files"])
@pytest.mark.parametrize("how", ["empty class", "unreadable image", "classes differ", "no train folder"])
def test_a_bad_tree_fails_naming_the_path(
    tree: Path, tmp_path: Path, how: str, storage: str, caplog: pytest.LogCaptureFixture
):
    culprit = _bad(tree, tmp_path, how)
    with pytest.raises(InputError, match=str(culprit)):
        raw = load_raw("imagefolder", tmp_path / "bad")
        if how == "unreadable image":  # a header check (streamed) or decoding (memory) finds it
            from components.stages.prepare import file_table

            file_table({"train": raw.train})  # type: ignore[dict-item]
    # and through the CLI: one line naming it, exit 2
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        monkeypatch.chdir(tmp_path)
        params = {
            "data": {
                "dataset": "imagefolder",
                "root": "bad",
                "image_size": 32,
                "storage": storage,
                "val_size": 9,
            }
        }
        Path("params.yaml").write_text(yaml.safe_dump(params))
        assert main(["prepare", "--prepared", "prepared"]) == 2
    finally:
        monkeypatch.undo()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors and str(culprit.relative_to(tmp_path)) in errors[-1] and "\n" not in errors[-1]
    assert not (tmp_path / "prepared").exists()


def test_a_streamed_image_that_went_missing_is_named(both: tuple[Path, Path], tmp_path: Path):
    prepared = tmp_path / "prepared"
    shutil.copytree(both[1], prepared)
    meta = json.loads((prepared / "meta.json").read_text())
    copy = tmp_path / "tree"
    shutil.copytree(meta["root"], copy)
    meta["root"] = str(copy)
    (prepared / "meta.json").write_text(json.dumps(meta))
    gone = copy / pq.read_table(prepared / FILES_TABLE).to_pydict()["file"][5]
    gone.unlink()
    with pytest.raises(InputError, match=f"{gone}: image missing"):
        load_prepared(prepared)
    # deleted after the checks: a DataLoader worker's error comes back as one InputError naming it
    gone.write_bytes(b"garbage")
    data = load_prepared(prepared, workers=2)
    assert isinstance(data.train, FileSplit)
    batches = StreamBatches(data.train, [0.5] * 3, [0.2] * 3, 8, 32, workers=2)
    with pytest.raises(InputError, match=f"{gone}: not a readable image"):
        list(batches)


def test_cifar10_binary_archive(tmp_path: Path):
    names = write_cifar10_binary(tmp_path, per_batch=20)
    raw = load_raw("cifar10", tmp_path)
    assert raw.classes == names
    assert raw.train.images.shape == (100, 3, 32, 32) and raw.test.images.shape == (20, 3, 32, 32)
    assert raw.train.labels.tolist() == list(np.arange(20) % 10) * 5


def test_cifar100_python_with_its_superclasses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fine_to_coarse = write_cifar100_python(tmp_path)
    raw = load_raw("cifar100", tmp_path)
    assert raw.coarse is not None and raw.coarse.fine_to_coarse == fine_to_coarse
    assert raw.coarse.names == [f"c{g}" for g in range(20)] and len(raw.classes) == 100
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    params = {"data": {"dataset": "cifar100", "root": ".", "val_size": 100}}
    params["score"] = {"coarse_map": "cifar100_superclasses"}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert main(["prepare", "--prepared", "prepared"]) == 0
    assert dataset_coarse_map(tmp_path / "prepared", "cifar100_superclasses", 100).tolist() == fine_to_coarse


def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path: Path):
    write_cifar100_python(tmp_path)

    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    (tmp_path / "cifar-100-python" / "meta").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="builtins.print is not allowed"):
        load_raw("cifar100", tmp_path)


def test_missing_cifar_says_where_it_looked(tmp_path: Path):
    with pytest.raises(InputError, match="cifar-10-batches-bin/ or cifar-10-binary.tar.gz"):
        load_raw("cifar10", tmp_path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"root": "../outside"}}, "leaves the workspace"),
        ({"train_teacher": {"init_checkpoint": "data/../../w.pt"}}, "leaves the workspace"),
        ({"data": {"image_size": 64}}, "data.image_size is read by dataset imagefolder only"),
        ({"data": {"storage": "files"}}, "data.storage is read by dataset imagefolder only"),
        ({"score": {"coarse_map": "cifar100_superclasses"}}, "comes with dataset cifar100"),
    ],
)
def test_dataset_params_are_checked(raw: dict, message: str):
    with pytest.raises(ParamsError, match=message):
        validate_params(raw, "params.yaml")


def test_path_params_inside_or_absolute_are_accepted():
    ok = validate_params({"data": {"root": "/srv/images", "dataset": "imagefolder"}}, "p")
    assert ok.data.root == "/srv/images"
    assert validate_params({"data": {"root": "data/raw/../raw"}}, "p").data.root == "data/raw/../raw"


def test_dvc_tracks_a_streamed_image_tree_outside_the_workspace(tmp_path: Path):
    """`data.dataset: imagefolder` with `data.root` an absolute path outside the workspace: DVC tracks
    the tree itself (every file), and a changed image reruns `prepare`. (The whole pipeline on a
    streamed tree, every stage reading the files: tests/test_kfp_streamed.py.)"""
    ws = tmp_path / "ws"
    env = make_workspace(ws, RAW)
    tree = make_image_tree(tmp_path / "images", CLASSES, {"train": 40, "val": 8, "test": 10})
    params = Params.model_validate(
        {**TINY, "data": {"dataset": "imagefolder", "root": str(tree), "image_size": 32, "storage": "files"}}
    )
    (ws / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    run_ok(["cdc", "repro", "prepare"], ws, env)
    meta = json.loads((ws / "data/prepared/meta.json").read_text())
    assert meta["storage"] == "files" and meta["root"] == str(tree) and meta["classes"] == CLASSES
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["prepare"]
    (data,) = [d for d in lock["deps"] if not d["path"].startswith(("cdc/", "components/"))]  # not the code
    assert data["path"] == str(tree) and data["nfiles"] == 3 * 58
    # a changed image is a changed dataset: DVC reruns prepare
    (tree / "train" / "ant" / "00000.jpg").write_bytes((tree / "train" / "bee" / "00000.jpg").read_bytes())
    status = run_ok(["dvc", "status", "prepare"], ws, env)
    assert "modified" in status and str(tree) in status
