"""A streamed image tree through the Kubeflow pipeline (`kfp.local`): pods share no disk, so the prepare
task copies the listed image files into the prepared dataset, and every later task reads them from
the artifact it was given, never from the raw tree's path (`cdc prepare --embed-files`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cdc.data import EMBEDDED_DIR, FILES_TABLE, load_prepared
from cdc.images import file_md5
from cdc.params import Params
from tests.image_tree import make_image_tree
from tests.workspace import TINY, clean_env, run_ok

CLASSES = ["ant", "bee", "cat"]


@pytest.mark.e2e
def test_a_streamed_image_tree_runs_under_kfp_local_from_the_prepared_artifact(tmp_path: Path):
    tree = make_image_tree(tmp_path / "images", CLASSES, {"train": 24, "val": 6, "test": 6})
    params = Params.model_validate(
        {
            **TINY,
            "data": {
                "dataset": "imagefolder",
                "root": str(tree),
                "image_size": 24,
                "storage": "files",
                "workers": 0,  # speed only; each task would start its own worker processes
            },
            "score": {"n_coarse": 2},
            "fit_dca": {"max_images": 40, "labels": "fine"},
            "evaluate": {**TINY["evaluate"], "latency_batch_sizes": [1]},
            "export": {"check_images": 16},
        }
    )
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    run_ok(
        ["cdc", "kfp", "run-local", "--raw", str(tree), "--pipeline-root", "runs"],
        work,
        clean_env(work / "m.db"),
    )
    (root,) = (work / "runs").glob("cdc-pipeline-*")
    prepared = root / "prepare" / "prepared"
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["storage"] == "files" and meta["files_embedded"] is True and "root" not in meta
    assert str(tree) not in (prepared / "meta.json").read_text()
    table = pq.read_table(prepared / FILES_TABLE).to_pydict()
    assert len(table["file"]) == 3 * 36
    for file, md5 in zip(table["file"], table["md5"], strict=True):
        assert file_md5(prepared / EMBEDDED_DIR / file) == md5, file
    evaluation = json.loads((root / "evaluate" / "metrics").read_text())
    assert {"teacher", "pruned", "student"} <= set(evaluation)
    # a pod that never saw the raw tree: the prepared artifact alone streams every split
    shutil.rmtree(tree)
    data = load_prepared(prepared, workers=0)
    for split in ("train", "val", "test"):
        assert sum(len(y) for _, y in data.batches(split, 32)) == meta["sizes"][split]
