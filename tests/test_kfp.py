"""The Kubeflow pipeline: built from the stage list, compiled spec current, same DAG as dvc.yaml, and a
real `kfp.local` run (subprocess runner) of every component that matches the `dvc repro` run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cdc.inference import load_torchscript, onnx_session
from cdc.io import load_model
from cdc.params import Params
from components.stages import RAW, STAGE_BY_NAME, STAGES
from components.tracking import md5
from pipeline.components import ARTIFACT_TYPES, output_kinds
from pipeline.dag import GPU_RESOURCE, compile_pipeline
from pipeline.defaults import COMPILED, DEFAULT_IMAGE
from tests.conftest import RAW as RAW_ROOT
from tests.conftest import REPO, TINY, clean_env, run_ok
from tools import lineage
from tools.cli import main


def task_name(stage: str) -> str:
    return stage.replace("_", "-")


@pytest.fixture(scope="module")
def spec() -> dict:
    """The committed pipeline spec, with its second YAML document (Kubernetes platform config) merged."""
    pipeline_spec, platform_spec = yaml.safe_load_all((REPO / COMPILED).read_text())
    return {**pipeline_spec, **platform_spec}


def test_committed_pipeline_spec_is_current(tmp_path: Path):
    fresh = compile_pipeline(tmp_path / "p.yaml", REPO / "params.yaml")
    assert fresh.read_text() == (REPO / COMPILED).read_text(), "stale: run `make compile`"


def dvc_edges() -> set[tuple[str, str]]:
    """(producer, consumer) stage pairs of the committed dvc.yaml, by matching deps to outs."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    producer = {}
    for name, stage in stages.items():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            producer[out if isinstance(out, str) else next(iter(out))] = name
    return {
        (producer[dep], name) for name, stage in stages.items() for dep in stage["deps"] if dep in producer
    }


def test_kfp_dag_has_the_stages_and_edges_of_dvc_yaml(spec: dict):
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {task_name(s.name) for s in STAGES} | {"importer"}
    kfp_edges = set()
    for name, task in tasks.items():
        for arg in task.get("inputs", {}).get("artifacts", {}).values():
            producer = arg["taskOutputArtifact"]["producerTask"]
            if producer != "importer":
                kfp_edges.add((producer, name))
        assert set(task.get("dependentTasks", [])) == {p for p, c in kfp_edges if c == name} | (
            {"importer"} if name == "prepare" else set()
        )
    assert kfp_edges == {(task_name(a), task_name(b)) for a, b in dvc_edges()}
    assert tasks["prepare"]["inputs"]["artifacts"]["raw"]["taskOutputArtifact"]["producerTask"] == "importer"


def test_one_typed_component_per_stage_with_gpu_only_where_a_model_runs(spec: dict):
    kinds = output_kinds()
    executors = spec["deploymentSpec"]["executors"]
    for stage in STAGES:
        comp = spec["components"][f"comp-{task_name(stage.name)}"]
        inputs = comp["inputDefinitions"]["artifacts"]
        outputs = comp["outputDefinitions"]["artifacts"]
        for name, path in stage.inputs.items():
            assert (
                inputs[name]["artifactType"]["schemaTitle"]
                == f"system.{ARTIFACT_TYPES[kinds[path]].__name__}"
            )
        for name, kind in stage.kinds.items():
            assert outputs[name]["artifactType"]["schemaTitle"] == f"system.{ARTIFACT_TYPES[kind].__name__}"
        assert set(comp["inputDefinitions"]["parameters"]) >= set(stage.params)
        container = executors[f"exec-{task_name(stage.name)}"]["container"]
        assert container["image"] == DEFAULT_IMAGE
        assert f"run_component({stage.name!r}, arguments)" in container["command"][-1]
        resources = container["resources"]
        assert "resourceCpuRequest" in resources and "resourceMemoryRequest" in resources
        if stage.runs_model:
            assert resources["accelerator"]["resourceType"] == GPU_RESOURCE
            assert "gpu_count" in resources["accelerator"]["resourceCount"]
        else:
            assert "accelerator" not in resources
        task = spec["root"]["dag"]["tasks"][task_name(stage.name)]
        assert task["cachingOptions"]["enableCache"] is True
        assert task["retryPolicy"]["maxRetryCount"] == 2
    assert {"model", "metrics", "report", "prepared"} <= {
        n for s in STAGES for n in s.kinds
    }  # Model, Metrics, Markdown and Dataset artifacts all occur
    assert {s.kinds["model"] for s in STAGES if "model" in s.kinds} == {"model"}
    evaluate = next(s for s in STAGES if s.name == "evaluate")
    assert evaluate.kinds["metrics"] == "metrics" and evaluate.kinds["report"] == "markdown"


def test_params_are_pipeline_parameters_with_the_params_file_as_defaults(spec: dict):
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    defaults = Params().model_dump(exclude_none=True)
    for section, value in defaults.items():
        got = parameters[section]["defaultValue"]
        if isinstance(value, dict):  # KFP structs carry numbers as floats
            assert Params.model_validate({section: got}) == Params.model_validate({section: value})
        else:
            assert got == value
    assert parameters["raw_uri"]["defaultValue"] == RAW
    assert parameters["gpu_count"]["parameterType"] == "NUMBER_INTEGER"


def test_cluster_settings_come_from_pod_metadata_and_secrets_never_the_spec(spec: dict):
    executors = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{task_name(s.name)}" for s in STAGES}
    for config in executors.values():
        env = {e["name"]: e["fieldPath"] for e in config["fieldPathAsEnv"]}
        assert env == {"KFP_RUN_ID": "metadata.labels['pipeline/runid']", "KFP_POD_NAME": "metadata.name"}
        (secret,) = config["secretAsEnv"]
        assert secret["optional"] is True
        assert {m["envVar"] for m in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        }
    text = (REPO / COMPILED).read_text()
    assert "aws_secret_access_key:" not in text.lower() and "password" not in text.lower()


def test_kfp_help_documents_every_subcommand(capsys: pytest.CaptureFixture[str]):
    def help_of(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--help"])
        assert exit_.value.code == 0
        return capsys.readouterr().out

    overview = help_of("kfp")
    for sub in ("compile", "run-local", "submit", "schedule"):
        assert sub in overview
        text = help_of("kfp", sub)
        assert f"usage: cdc kfp {sub}" in text
        options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
        assert options, sub
    assert "--cron" in help_of("kfp", "schedule") and "--raw-uri" in help_of("kfp", "submit")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """`cdc kfp run-local` of the tiny profile (the same params as the `dvc repro` fixture)."""
    work = tmp_path_factory.mktemp("kfp")
    (work / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(TINY).model_dump()))
    env = clean_env(work / "mlflow.db")
    out = run_ok(["cdc", "kfp", "run-local", "--raw", str(RAW_ROOT), "--pipeline-root", "runs"], work, env)
    (root,) = (work / "runs").iterdir()
    return root, env, out


@pytest.mark.e2e
def test_run_local_writes_every_artifact_and_the_student_reloads(local_run):
    root, _, out = local_run
    for stage in STAGES:
        for name in stage.outputs:
            path = root / task_name(stage.name) / name
            assert path.exists() and (path.is_dir() or path.stat().st_size > 0), path
    executor = json.loads((root / "evaluate" / "executor_output.json").read_text())
    metrics = executor["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    for model in ("teacher", "pruned", "student"):
        assert {f"{model}.test_acc", f"{model}.flops", f"{model}.latency_ms_b1"} <= set(metrics)
    assert metrics["latency_device"].startswith("cpu")
    assert metrics["student.flops"] < 0.5 * metrics["teacher.flops"]
    # the student reloads in a fresh process, weights only
    code = "import sys; from cdc.io import load_model; m, r = load_model(sys.argv[1]); print(r['widths'])"
    widths = subprocess.run(
        [sys.executable, "-c", code, str(root / "distill" / "model")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert widths.strip() == str(load_model(root / "prune" / "model")[1]["widths"])
    assert "| student (distilled) |" in out  # the summary is printed


@pytest.mark.e2e
def test_run_local_logs_one_pipeline_run_with_a_nested_run_per_component(local_run):
    import mlflow

    _, env, _ = local_run
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cdc").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("cdc.stage") == "pipeline"]
    assert parent.info.status == "FINISHED"
    kfp_run = parent.data.tags["kfp.run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["cdc.stage"] for r in children) == sorted(s.name for s in STAGES)
    for run in children:
        assert run.data.tags["kfp.run_id"] == kfp_run
        assert run.data.tags["kfp.task_name"] == task_name(run.data.tags["cdc.stage"])
        assert run.info.status == "FINISHED" and run.data.params


@pytest.mark.e2e
def test_kubeflow_and_dvc_runs_give_the_same_artifacts(local_run, first_records):
    """Determinism, proved: the tiny pipeline run twice, in two directories by two runners (kfp.local
    here, `cdc repro` in the shared workspace), with the same params gives the same bytes for every
    output of every stage — by the hashes DVC recorded — except the evaluation's measured latencies;
    its accuracies, FLOPs and params are equal too."""
    root, _, _ = local_run
    first_lock, dvc_metrics = first_records
    recorded = {p: h for entry in first_lock["stages"].values() for p, h in lineage.outs(entry).items()}
    timed = {STAGE_BY_NAME["evaluate"].outputs[n] for n in ("metrics", "report")}
    # a TorchScript archive carries a per-process serialization id: compared by what it computes
    scripted = STAGE_BY_NAME["export"].outputs["torchscript"]
    compared = 0
    for stage in STAGES:
        for name, path in stage.outputs.items():
            if path in timed or path == scripted:
                continue
            assert md5(root / task_name(stage.name) / name) == recorded[path], path
            compared += 1
    assert compared == len(recorded) - len(timed) - 1 >= 19
    x = torch.rand(4, *json.loads((root / "prepare" / "prepared" / "meta.json").read_text())["input_shape"])
    with torch.no_grad():
        expected = load_torchscript(root / "export" / "torchscript")(x)
        onnx = onnx_session((root / "export" / "onnx").read_bytes()).run(None, {"images": x.numpy()})[0]
    torch.testing.assert_close(expected, torch.from_numpy(onnx), rtol=1e-4, atol=1e-4)
    kfp_metrics = json.loads((root / "evaluate" / "metrics").read_text())
    for model in ("teacher", "pruned", "student"):
        for key in ("test_acc", "val_acc", "flops", "params"):
            assert kfp_metrics[model][key] == dvc_metrics[model][key], (model, key)
