"""Lineage end to end: the tiny `cdc repro` workspace (real DVC, MLflow on SQLite), copied, audited
with `cdc lineage show | diff | verify`; the registered and exported student. (Determinism across two
directories: tests/test_kfp.py compares every hash of a kfp.local run with this run's dvc.lock.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from cdc.data import load_prepared
from cdc.device import float_platform
from cdc.inference import load_torchscript, onnx_session
from cdc.io import load_model
from cdc.params import Params
from components.stages import STAGE_BY_NAME, STAGES, USER_MODELS
from components.tracking import md5
from tests.conftest import TINY, copy_workspace, run_ok
from tests.workspace import run_here
from tools import lineage

pytestmark = pytest.mark.e2e
STAGE_NAMES = [s.name for s in STAGES]


@pytest.fixture(scope="module")
def audited(workspace, first_repro, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the tiny workspace after its `cdc repro`."""
    return copy_workspace(workspace, tmp_path_factory.mktemp("lineage") / "repo")


def cdc(args: list[str], ws: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_here(args, ws, env)


def lock_outs(ws: Path) -> dict[str, str]:
    stages = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    return {p: h for entry in stages.values() for p, h in lineage.outs(entry).items()}


def client(env: dict[str, str]) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def pipeline_runs(env: dict[str, str]) -> list:
    c = client(env)
    experiment = c.get_experiment_by_name("cdc")
    return c.search_runs(
        [experiment.experiment_id], "tags.`cdc.stage` = 'pipeline'", order_by=["attributes.start_time ASC"]
    )


def head(ws: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True).stdout.strip()


def test_dvc_lock_producer_and_upstream_on_a_hand_written_lock():
    lock = {
        "a": {"deps": [{"path": "raw", "md5": "r"}], "outs": [{"path": "d/x", "md5": "1.dir"}]},
        "b": {"deps": [{"path": "d/x/f.npz", "md5": "2"}], "outs": [{"path": "m.pt", "md5": "3"}]},
        "c": {"deps": [{"path": "raw", "md5": "r"}], "outs": [{"path": "other", "md5": "4"}]},
        "d": {"deps": [{"path": "m.pt", "md5": "3"}, {"path": "other", "md5": "4"}], "outs": []},
    }
    assert lineage.producer(lock, "d/x/f.npz") == "a" and lineage.producer(lock, "raw") is None
    assert lineage.upstream(lock, "b") == ["a", "b"]
    assert lineage.upstream(lock, "d") == ["a", "b", "c", "d"]


def test_diff_separates_changed_inputs_from_outputs_that_moved_on_their_own():
    def lock(ratio: float, student: str, report: str) -> dict:
        return {
            "prune": {
                "params": {"params.yaml": {"prune": {"ratio": ratio}}},
                "deps": [{"path": "t.pt", "md5": "t"}],
                "outs": [{"path": "p.pt", "md5": f"p{ratio}"}],
            },
            "distill": {
                "deps": [{"path": "p.pt", "md5": f"p{ratio}"}],
                "outs": [{"path": "s.pt", "md5": student}],
            },
            "evaluate": {"deps": [{"path": "s.pt", "md5": "s"}], "outs": [{"path": "m.json", "md5": report}]},
        }

    a = lineage.Snapshot("a", "git revision", None, lock(0.5, "s", "m1"), {"m.json": {"acc": 0.9, "ms": 2}})
    b = lineage.Snapshot("b", "git revision", None, lock(0.4, "s", "m2"), {"m.json": {"acc": 0.9, "ms": 3}})
    d = lineage.diff(a, b)
    assert d.params == {"prune.ratio": (0.5, 0.4)}
    assert d.stages_rerun == ["prune", "distill", "evaluate"]
    assert d.artifacts == {"p.pt": ("p0.5", "p0.4"), "m.json": ("m1", "m2")}
    assert d.same_inputs_other_outputs == ["evaluate"]  # its input did not change, its bytes did
    assert d.metrics == {"m.json:ms": (2, 3, 1)} and d.code is None
    assert "platform" not in lineage.format_diff(d)  # none recorded: nothing claimed
    # pipeline runs on two CPU platforms: the diff says so, beside the outputs that moved
    a.platforms, b.platforms = ["Intel Xeon, AVX512 kernels, torch 2"], ["AMD EPYC, AVX2 kernels, torch 2"]
    text = lineage.format_diff(lineage.diff(a, b))
    assert "platform: Intel Xeon, AVX512 kernels, torch 2 -> AMD EPYC, AVX2 kernels, torch 2" in text
    assert "another CPU or kernel path" in text


def test_diff_names_the_changed_code_each_stage_runs():
    """dvc.yaml lists the code a stage runs; the diff names, per rerun stage, the files that changed."""

    def lock(scoring: str) -> dict:
        code = [{"path": "cdc/models.py", "md5": "m"}]
        return {
            "prune": {"deps": [{"path": "t.pt", "md5": "t"}, *code], "outs": [{"path": "p.pt", "md5": "p"}]},
            "score": {
                "deps": [{"path": "t.pt", "md5": "t"}, *code, {"path": "cdc/scoring.py", "md5": scoring}],
                "outs": [{"path": "s.pq", "md5": "s"}],
            },
        }

    a = lineage.Snapshot("a", "git revision", None, lock("x"), {})
    b = lineage.Snapshot("b", "git revision", None, lock("y"), {})
    d = lineage.diff(a, b)
    assert d.stages_rerun == ["score"] and d.code_per_stage == {"score": ["cdc/scoring.py"]}
    assert d.same_inputs_other_outputs == []  # its code changed: not a finding
    assert "  score runs changed code: cdc/scoring.py" in lineage.format_diff(d)


def test_hashes_on_mlflow_runs_are_the_ones_dvc_lock_records_directories_included(audited):
    ws, env = audited
    recorded = lock_outs(ws)
    assert any(h.endswith(".dir") for h in recorded.values())
    for path, h in recorded.items():
        assert md5(ws / path) == h, path
    c = client(env)
    compared = set()
    for stage in STAGES:  # the latest run of each stage wrote what is in the workspace now
        run = c.search_runs(
            [c.get_experiment_by_name("cdc").experiment_id],
            f"tags.`cdc.stage` = '{stage.name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )[0]
        for name, path in stage.outputs.items():
            assert run.data.tags[f"cdc.output.{name}.path"] == path
            assert run.data.tags[f"cdc.output.{name}.md5"] == recorded[path], path
            compared.add(path)
    assert compared == set(recorded)


def test_verify_passes_on_an_untouched_run(audited):
    ws, env = audited
    proc = cdc(["lineage", "verify"], ws, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK: ") and f"of {len(STAGES)} stages" in proc.stdout


def test_show_traces_the_registered_student_back_to_the_raw_data(audited):
    ws, env = audited
    proc = cdc(["lineage", "show", "models:/cdc-student@candidate", "--json"], ws, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trace = json.loads(proc.stdout)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert [s["stage"] for s in trace["stages"]] == [n for n in STAGE_NAMES if n != "evaluate"]
    assert trace["sources"] == {  # the raw data, and the user's model folder (models/: code, checkpoints)
        "data/raw": lineage.deps(lock["prepare"])["data/raw"],
        USER_MODELS: lineage.deps(lock["train_teacher"])[USER_MODELS],
    }
    for record in trace["stages"]:
        assert record["run_id"] and record["commit"].startswith(head(ws)), record["stage"]
        assert record["platform"] == float_platform()  # this machine, this kernel path
        assert record["outputs"] == lineage.outs(lock[record["stage"]])
        assert record["params"] == lineage.stage_params(lock[record["stage"]])
    assert trace["stages"][0]["inputs"] == {"data/raw": lineage.deps(lock["prepare"])["data/raw"]}
    text = cdc(["lineage", "show", "data/student/model.pt"], ws, env).stdout
    upstream_of_student = [n for n in STAGE_NAMES if n not in ("evaluate", "export")]
    assert text.startswith(f"data/student/model.pt: {len(upstream_of_student)} stages")
    assert "source  data/raw" in text
    diagram = cdc(["lineage", "show", "data/prune/model.pt", "--mermaid"], ws, env).stdout
    assert diagram.startswith("flowchart LR") and "s_prune" in diagram and "s_distill" not in diagram
    # a pipeline run id: its whole DAG, read from the dvc.lock it logged
    run = pipeline_runs(env)[0]
    whole = json.loads(cdc(["lineage", "show", run.info.run_id, "--json"], ws, env).stdout)
    assert [s["stage"] for s in whole["stages"]] == STAGE_NAMES
    missing = cdc(["lineage", "show", "data/nothing.pt"], ws, env)
    assert (
        missing.returncode == 2
        and "no stage output" in missing.stdout
        and "data/prune/model.pt" in missing.stdout
    )


def test_exports_reproduce_the_student_and_the_registry_serves_it(audited):
    ws, env = audited
    data = load_prepared(ws / "data/prepared")
    images = torch.from_numpy(data.test.images[:64]).float() / 255.0
    mean = torch.tensor(data.meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data.meta["std"]).view(1, -1, 1, 1)
    student = load_model(ws / "data/student/model.pt")[0].eval()
    with torch.no_grad():
        expected = student((images - mean) / std).numpy()
    session = onnx_session((ws / "data/export/student.onnx").read_bytes())
    onnx_logits = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        ts_logits = load_torchscript(ws / "data/export/student.torchscript.pt")(images).numpy()
    for logits in (onnx_logits, ts_logits):
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # the exports name no folder of the machine that wrote them (the code's, the interpreter's, the run's)
    folders = [str(Path(__file__).parents[1]), sys.prefix, str(Path(torch.__file__).parent), str(ws)]
    for export in ("student.onnx", "student.torchscript.pt"):
        raw = (ws / "data/export" / export).read_bytes()
        assert [f for f in folders if f.encode() in raw] == [], export
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    served = mlflow.pyfunc.load_model("models:/cdc-student@candidate").predict(images.numpy()[:5])
    np.testing.assert_array_equal(np.asarray(served).argmax(1), expected[:5].argmax(1))  # batch 5: dynamic
    version = client(env).get_model_version_by_alias("cdc-student", "candidate")
    export_run = client(env).get_run(version.run_id)
    assert export_run.data.tags["cdc.stage"] == "export"
    assert version.tags["cdc.student.md5"] == lock_outs(ws)["data/student/model.pt"]
    # a plain `dvc repro` (the latest here) has no pipeline run: the tag is there, empty
    assert version.tags["cdc.run_id"] == version.run_id and "cdc.pipeline_run_id" in version.tags
    promoted = cdc(["promote"], ws, env)
    assert promoted.returncode == 0 and f"@champion -> version {version.version}" in promoted.stdout
    assert client(env).get_model_version_by_alias("cdc-student", "champion").version == version.version


def test_pipeline_run_carries_the_headline_metrics_and_which_stages_ran(audited, first_records):
    _, env = audited
    (run,) = pipeline_runs(env)  # the first `cdc repro`: every stage ran
    _, evaluation = first_records
    assert run.data.metrics["student_test_acc"] == evaluation["student"]["test_acc"]
    assert run.data.metrics["teacher_test_acc"] == evaluation["teacher"]["test_acc"]
    for key in ("flops_ratio", "params_ratio", "speedup_b1", "speedup_b64"):
        assert run.data.metrics[key] == evaluation["student_vs_teacher"][key]
    assert run.data.params["prune.ratio"] == "0.53" and run.data.params["score.criterion"] == "symdiv"
    assert run.data.tags["cdc.stages.ran"] == ",".join(STAGE_NAMES)
    assert run.data.tags["cdc.stages.skipped"] == "" and run.data.tags["cdc.stages.restored"] == ""


def test_diff_of_two_runs_that_differ_in_one_distill_param(audited):
    """Changing a distillation param reruns distill and what follows, nothing else (as `cdc repro`'s
    pipeline run records what `dvc repro` ran); pipeline runs, git revisions and DVC experiments all
    resolve; the diff names exactly the param, the stages downstream of it, their outputs and the
    metrics that moved."""
    ws, env = audited
    run_ok(["git", "add", "-u"], ws, env)  # what DVC changed; not the files other tests left here
    run_ok(["git", "commit", "-qm", "baseline run"], ws, env)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    committed = params["distill"]["temperature"]  # other tests may have changed it from the first run's
    first_temperature = Params.model_validate(TINY).distill.temperature
    new = max(committed, first_temperature) + 1.0
    params["distill"]["temperature"] = new
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    run_ok(["cdc", "repro"], ws, env)
    first, second = pipeline_runs(env)
    assert second.data.tags["cdc.stages.ran"] == "distill,evaluate,export"
    skipped = "prepare,train_teacher,dump_stats,score,latency_table,prune,fit_dca"
    assert second.data.tags["cdc.stages.skipped"] == skipped
    run_ok(["dvc", "exp", "save", "-n", "hotter"], ws, env)
    downstream = {
        p for name in ("distill", "evaluate", "export") for p in STAGE_BY_NAME[name].outputs.values()
    }
    pairs = {
        (first.info.run_id, second.info.run_id): first_temperature,
        ("HEAD", "hotter"): committed,
        ("HEAD", "workspace"): committed,
    }
    for (a, b), before in pairs.items():
        proc = cdc(["lineage", "diff", a, b, "--json"], ws, env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        d = json.loads(proc.stdout)
        assert d["params"] == {"distill.temperature": [before, new]}, (a, b)
        assert d["stages_rerun"] == ["distill", "evaluate", "export"]
        assert set(d["artifacts"]) <= downstream and "data/student/model.pt" in d["artifacts"]
        assert all(k.split(":")[0] in {"metrics/student.json", "metrics/evaluate.json"} for k in d["metrics"])
        assert "metrics/student.json:val_loss" in d["metrics"]
        old_loss, new_loss, delta = d["metrics"]["metrics/student.json:val_loss"]
        assert delta == pytest.approx(new_loss - old_loss)
        assert not [f for f in d["code"] if f.startswith(("cdc/", "components/", "pipeline/", "tools/"))]
        assert d["same_inputs_other_outputs"] == []  # every rerun stage had a changed input
    text = cdc(["lineage", "diff", "HEAD"], ws, env).stdout
    assert f"distill.temperature: {committed} -> {new}" in text
    assert "stages rerun (3): distill, evaluate, export" in text
    bad = cdc(["lineage", "diff", "no-such-run", "HEAD"], ws, env)
    assert bad.returncode == 2 and "no git revision, DVC experiment" in bad.stdout
    # the experiment's and the earlier tests' runs are all accounted for: verify still passes
    proc = cdc(["lineage", "verify"], ws, env)
    assert proc.returncode == 0, proc.stdout


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_suffix(".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _tamper_checkpoint(ws: Path, env: dict[str, str]):
    path = ws / "data/prune/model.pt"
    original = path.read_bytes()
    path.write_bytes(original + b"\0")
    return lambda: path.write_bytes(original)


def _tamper_parquet(ws: Path, env: dict[str, str]):
    a, b = ws / "data/stats/stats.parquet", ws / "data/stats/grid.parquet"
    _swap(a, b)
    return lambda: _swap(a, b)


def _tamper_params(ws: Path, env: dict[str, str]):
    path = ws / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params["prune"]["ratio"] = 0.4
    path.write_text(yaml.safe_dump(params))
    return lambda: path.write_text(original)


def _tamper_delete(ws: Path, env: dict[str, str]):
    path = ws / "data/dca/dca.npz"
    kept = path.with_suffix(".kept")
    shutil.move(path, kept)
    return lambda: shutil.move(kept, path)


def _tamper_record(ws: Path, env: dict[str, str]):
    """Every run of `score` now claims other scores than the ones dvc.lock holds."""
    c = client(env)
    runs = c.search_runs([c.get_experiment_by_name("cdc").experiment_id], "tags.`cdc.stage` = 'score'")
    tag = "cdc.output.scores.md5"
    originals = {r.info.run_id: r.data.tags[tag] for r in runs}
    for run_id in originals:
        c.set_tag(run_id, tag, "0" * 32)

    def restore() -> None:
        for run_id, value in originals.items():
            c.set_tag(run_id, tag, value)

    return restore


@pytest.mark.parametrize(
    ("tamper", "kind", "where"),
    [
        (_tamper_checkpoint, "modified", "data/prune/model.pt"),
        (_tamper_parquet, "modified", "data/stats/grid.parquet"),
        (_tamper_params, "params", "params.yaml:prune.ratio"),
        (_tamper_delete, "missing", "data/dca/dca.npz"),
        (_tamper_record, "record", "MLflow run"),
    ],
    ids=["modified-checkpoint", "swapped-parquet", "params-without-rerun", "deleted-output", "mlflow-record"],
)
def test_verify_reports_each_tampering_with_a_nonzero_exit(audited, tamper, kind, where):
    ws, env = audited
    restore = tamper(ws, env)
    try:
        proc = cdc(["lineage", "verify", "--json"], ws, env)
    finally:
        restore()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert not report["ok"]
    assert any(f["kind"] == kind and f["where"].startswith(where) for f in report["findings"]), report
    if tamper is _tamper_record:  # no run vouches for the scores any more
        assert any(f["kind"] == "untracked" and f["where"] == "score" for f in report["findings"])


def test_experiment_names_resolve_as_dvc_resolves_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An experiment of the current commit wins; a name used on two other baselines is refused."""
    monkeypatch.chdir(tmp_path)
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def commit(message: str) -> str:
        subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", message], check=True)
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    def experiment(baseline: str, name: str, sha: str) -> None:
        subprocess.run(
            ["git", "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}", sha], check=True
        )

    subprocess.run(["git", "init", "-q"], check=True)
    first, exp_a = commit("first"), commit("exp a")
    second, exp_b = commit("second"), commit("exp b")
    experiment(first, "ratio", exp_a)
    assert lineage._experiment_commit("ratio") == exp_a  # the only one of that name
    experiment(second, "ratio", exp_b)
    subprocess.run(["git", "checkout", "-q", second], check=True)
    assert lineage._experiment_commit("ratio") == exp_b  # the current commit's
    commit("third")  # now on neither baseline
    with pytest.raises(lineage.LineageError, match="ambiguous"):
        lineage._experiment_commit("ratio")
    with pytest.raises(lineage.LineageError, match="no git revision"):
        lineage._experiment_commit("absent")
