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
from components.checkpoint import FAILPOINT_ENV
from components.stages import RAW, STAGE_BY_NAME, STAGES
from components.tracking import md5
from pipeline.components import ARTIFACT_TYPES, output_kinds
from pipeline.dag import compile_pipeline
from pipeline.defaults import COMPILED, DEFAULT_IMAGE
from pipeline.pods import GPU_RESOURCE, PodSettings, Toleration
from tests.conftest import RAW as RAW_ROOT
from tests.conftest import REPO, TINY, clean_env, run_ok
from tools import lineage
from tools.cli import main


def task_name(stage: str) -> str:
    return stage.replace("_", "-")


def load_spec(path: Path) -> dict:
    """A compiled spec, with its second YAML document (Kubernetes platform config) merged."""
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    return {**pipeline_spec, **platform_spec}


@pytest.fixture(scope="module")
def spec() -> dict:
    return load_spec(REPO / COMPILED)


def body(spec: dict) -> dict:
    """The tasks inside the exit handler: every stage's, the raw_uri check and the importer."""
    (handler,) = [
        t for t in spec["root"]["dag"]["tasks"].values() if "exit-handler" in t["componentRef"]["name"]
    ]
    return spec["components"][handler["componentRef"]["name"]]["dag"]["tasks"]


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
    tasks = body(spec)
    assert set(tasks) == {task_name(s.name) for s in STAGES} | {"importer", "check-raw-uri"}
    assert tasks["importer"]["dependentTasks"] == ["check-raw-uri"]
    # the exit task runs after everything, whatever happened
    exit_task = spec["root"]["dag"]["tasks"]["close-mlflow-run"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert "taskFinalStatus" in json.dumps(exit_task["inputs"])
    kfp_edges = set()
    for name, task in tasks.items():
        if name in ("importer", "check-raw-uri"):
            continue
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
        assert set(comp["inputDefinitions"]["parameters"]) >= set(stage.sections)
        container = executors[f"exec-{task_name(stage.name)}"]["container"]
        assert container["image"] == DEFAULT_IMAGE
        assert f"run_component({stage.name!r}, arguments)" in container["command"][-1]
        resources = container["resources"]
        assert "resourceCpuRequest" in resources and "resourceMemoryRequest" in resources
        if stage.runs_model:
            assert resources["accelerator"]["resourceType"] == GPU_RESOURCE
            assert resources["accelerator"]["resourceCount"] == "1"
        else:
            assert "accelerator" not in resources
        task = body(spec)[task_name(stage.name)]
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
    # no default: a run started from the UI without one stops at the check, naming raw_uri
    assert parameters["raw_uri"]["defaultValue"] == "" and RAW not in json.dumps(parameters["raw_uri"])
    assert parameters["checkpoint_root"]["defaultValue"] == ""


def test_cluster_settings_come_from_pod_metadata_and_secrets_never_the_spec(spec: dict):
    executors = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    extra = {"exec-check-raw-uri", "exec-close-mlflow-run"}
    assert set(executors) == {f"exec-{task_name(s.name)}" for s in STAGES} | extra
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


def resources_of(spec: dict, stage: str) -> tuple[dict, dict]:
    """(container resources, Kubernetes executor config) of a task."""
    container = spec["deploymentSpec"]["executors"][f"exec-{task_name(stage)}"]["container"]
    return container["resources"], spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"][
        f"exec-{task_name(stage)}"
    ]


def test_the_latency_table_task_gets_a_gpu_when_its_target_is_cuda(tmp_path: Path):
    """The latency table is timed on `latency.device`, not `runtime`'s: a CUDA target asks for a GPU."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["latency"]["device"] = "cuda"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    spec = load_spec(compile_pipeline(tmp_path / "p.yaml", tmp_path / "params.yaml", PodSettings()))
    resources, _ = resources_of(spec, "latency_table")
    assert resources["accelerator"]["resourceCount"] == "1"
    default = load_spec(compile_pipeline(tmp_path / "d.yaml", REPO / "params.yaml", PodSettings()))
    assert "accelerator" not in resources_of(default, "latency_table")[0]


def test_gpu_pool_settings_compile_into_the_spec_where_they_belong(tmp_path: Path):
    """Tolerations, a node selector, /dev/shm and the GPU count go to the GPU tasks only; GPUs: the count on
    the multi-process stages, one on the other model stages, none elsewhere; CPUs and memory scale with
    them, limits equal requests; every task has a deadline and the pull secret."""
    pods = PodSettings(
        image="registry.example.com/ml/cdc@sha256:" + "a" * 64,
        gpus=4,
        tolerations=(
            Toleration.parse("nvidia.com/gpu=present:NoSchedule"),
            Toleration.parse("spot:NoExecute"),
        ),
        node_selector=(("cloud.google.com/gke-accelerator", "nvidia-l4"),),
        shm_gb=2,
        gpu_timeout_h=10,
        cpu_timeout_h=1,
        image_pull_secret="regcred",
    )
    spec = load_spec(compile_pipeline(tmp_path / "p.yaml", REPO / "params.yaml", pods))
    for stage in STAGES:
        resources, k8s = resources_of(spec, stage.name)
        gpus = (4 if stage.distributed else 1) if stage.runs_model else 0
        assert resources.get("accelerator", {}).get("resourceCount", "0") == str(gpus), stage.name
        cpu, memory = (4 * gpus, f"{16 * gpus + 2}Gi") if gpus else (1, "4Gi")
        assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == str(cpu)
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == memory
        assert k8s["activeDeadlineSeconds"] == str(36000 if gpus else 3600)
        assert k8s["imagePullSecret"][0]["secretName"] == "regcred"
        if gpus:
            assert k8s["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
                {"key": "spot", "operator": "Exists", "effect": "NoExecute"},
            ]
            assert k8s["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
            (shm,) = k8s["emptyDirMounts"]
            assert shm == {
                "volumeName": "dshm",
                "mountPath": "/dev/shm",
                "medium": "Memory",
                "sizeLimit": "2Gi",
            }
        else:
            assert not {"tolerations", "nodeSelector", "emptyDirMounts"} & set(k8s), stage.name
        assert (
            spec["deploymentSpec"]["executors"][f"exec-{task_name(stage.name)}"]["container"]["image"]
            == pods.image
        )
    # the committed spec (defaults) has no placement: nothing a cluster might not have
    committed = (REPO / COMPILED).read_text()
    assert "tolerations" not in committed and "nodeSelector" not in committed


@pytest.mark.parametrize("bad", ["nvidia.com/gpu", "key=value:Sometimes", ":NoSchedule"])
def test_a_bad_toleration_is_refused(bad: str):
    with pytest.raises(ValueError, match="KEY"):
        Toleration.parse(bad)


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


PREEMPTED_AT = "train_teacher.step:2:TERM"  # SIGTERM, a preemption notice, after step 2 of epoch 1


@pytest.fixture(scope="module")
def preempted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """A first `cdc kfp run-local` of the tiny profile whose teacher training gets SIGTERM mid-epoch, as
    a preempted pod does: it checkpoints at the next step and the task fails (no retries locally)."""
    work = tmp_path_factory.mktemp("kfp")
    (work / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(TINY).model_dump()))
    env = clean_env(work / "mlflow.db")
    args = ["cdc", "kfp", "run-local", "--raw", str(RAW_ROOT), "--pipeline-root", "runs"]
    proc = subprocess.run(
        args, cwd=work, env={**env, FAILPOINT_ENV: PREEMPTED_AT}, capture_output=True, text=True
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    return work, env, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def local_run(preempted) -> tuple[Path, dict[str, str], str]:
    """`cdc kfp run-local` again, uninterrupted, in the same folder: each task has a fresh folder, as a
    new pod does, so the teacher can only resume from the durable checkpoint root."""
    work, env, _ = preempted
    out = run_ok(["cdc", "kfp", "run-local", "--raw", str(RAW_ROOT), "--pipeline-root", "runs"], work, env)
    root = max((work / "runs").glob("cdc-pipeline-*"))
    return root, env, out


@pytest.mark.e2e
def test_a_preempted_training_task_resumes_from_the_durable_checkpoints(preempted, local_run):
    """Item of the cluster: the checkpoint outlives the task's folder (pod); the rerun copies it back and
    continues mid-epoch (that it ends with the uninterrupted weights: the DVC comparison below)."""
    work, _, first = preempted
    _, _, second = local_run
    assert "train_teacher stopped in epoch 1 after step" in first
    mirror = work / "runs" / "checkpoints" / "train_teacher"
    assert "checkpoints copied from " + str(mirror) in second
    assert "resumed from" in second and "after epoch 0 step" in second
    assert list(mirror.rglob("*.pt")) == []  # a finished run leaves nothing to resume
    runs = sorted((work / "runs").glob("cdc-pipeline-*"))
    assert len(runs) == 2 and not (runs[0] / "train-teacher" / "model").exists()


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
    """The exit task closed both pipeline runs: the preempted one FAILED, naming the stages that did not
    run; the second FINISHED, every stage run in it (none cached)."""
    import mlflow

    _, env, _ = local_run
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cdc").experiment_id])
    failed, parent = sorted(
        (r for r in runs if r.data.tags.get("cdc.stage") == "pipeline"), key=lambda r: r.info.start_time
    )
    assert failed.info.status == "FAILED" and failed.data.tags["kfp.state"] == "FAILED"
    assert failed.data.tags["kfp.tasks_ran"] == "prepare,train_teacher"
    assert failed.data.tags["kfp.tasks_not_run"].split(",") == [s.name for s in STAGES[2:]]
    assert parent.info.status == "FINISHED" and parent.data.tags["kfp.state"] == "SUCCEEDED"
    assert sorted(parent.data.tags["kfp.tasks_ran"].split(",")) == sorted(s.name for s in STAGES)
    assert parent.data.tags["kfp.tasks_cached"] == ""
    kfp_run = parent.data.tags["kfp.run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["cdc.stage"] for r in children) == sorted(s.name for s in STAGES)
    for run in children:
        assert run.data.tags["kfp.run_id"] == kfp_run
        assert run.data.tags["kfp.task_name"] == task_name(run.data.tags["cdc.stage"])
        assert run.info.status == "FINISHED" and run.data.params


def same_content(a: object, b: object) -> bool:
    """Equal nested dicts/lists of tensors and plain values (every tensor element equal)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_content(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_content, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.e2e
def test_kubeflow_and_dvc_runs_give_the_same_artifacts(local_run, first_records, workspace):
    """Determinism, proved: the tiny pipeline run twice, in two directories by two runners (kfp.local
    here, its teacher resumed after a preemption, `cdc repro` uninterrupted in the shared workspace),
    with the same params gives the same bytes for every output of every stage — by the hashes DVC
    recorded — except the evaluation's measured latencies; its accuracies, FLOPs and params are equal too."""
    root, _, _ = local_run
    first_lock, dvc_metrics = first_records
    recorded = {p: h for entry in first_lock["stages"].values() for p, h in lineage.outs(entry).items()}
    timed = {STAGE_BY_NAME["evaluate"].outputs[n] for n in ("metrics", "report")}
    # a TorchScript archive carries a per-process serialization id: compared by what it computes
    scripted = STAGE_BY_NAME["export"].outputs["torchscript"]
    # the resumed teacher's epoch checkpoint holds what the uninterrupted one holds, every tensor equal,
    # but was pickled from restored state (other storage sharing): compared by content, not bytes
    resumed = STAGE_BY_NAME["train_teacher"].outputs["checkpoints"]
    ws, _ = workspace
    kfp_files = sorted(p.name for p in (root / "train-teacher" / "checkpoints").iterdir())
    assert kfp_files == sorted(p.name for p in (ws / resumed).iterdir()) == ["epoch_001.pt"]
    for file in kfp_files:
        ours = torch.load(root / "train-teacher" / "checkpoints" / file, weights_only=False)
        assert same_content(ours, torch.load(ws / resumed / file, weights_only=False)), file
    compared = 0
    for stage in STAGES:
        for name, path in stage.outputs.items():
            if path in timed or path in (scripted, resumed):
                continue
            assert md5(root / task_name(stage.name) / name) == recorded[path], path
            compared += 1
    assert compared == len(recorded) - len(timed) - 2 >= 19
    x = torch.rand(4, *json.loads((root / "prepare" / "prepared" / "meta.json").read_text())["input_shape"])
    with torch.no_grad():
        expected = load_torchscript(root / "export" / "torchscript")(x)
        onnx = onnx_session((root / "export" / "onnx").read_bytes()).run(None, {"images": x.numpy()})[0]
    torch.testing.assert_close(expected, torch.from_numpy(onnx), rtol=1e-4, atol=1e-4)
    kfp_metrics = json.loads((root / "evaluate" / "metrics").read_text())
    for model in ("teacher", "pruned", "student"):
        for key in ("test_acc", "val_acc", "flops", "params"):
            assert kfp_metrics[model][key] == dvc_metrics[model][key], (model, key)


@pytest.mark.parametrize("state", ["SUCCEEDED", "FAILED", "CANCELED"])
def test_the_exit_task_closes_the_pipeline_run_with_the_runs_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str
):
    """The exit task's body with the status object Kubeflow hands it (the whole exit task under kfp.local,
    after a failed task: the preempted run above): the pipeline run ends FINISHED, FAILED or KILLED."""
    import mlflow
    from kfp import dsl

    from pipeline.run_record import RUN_ID_ENV, close_pipeline_run, pipeline_run

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv(RUN_ID_ENV, f"run-{state}")
    parent = pipeline_run(f"run-{state}")
    message = "Task train-teacher failed." if state == "FAILED" else None
    status = dsl.PipelineTaskFinalStatus(state, f"run-{state}", "exit-handler-1", None, message)
    close_pipeline_run(status, {"mlflow_tracking_uri": store})
    run = mlflow.MlflowClient(tracking_uri=store).get_run(parent)
    assert run.info.status == {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELED": "KILLED"}[state]
    assert run.data.tags["kfp.state"] == state and run.data.tags.get("kfp.error") == message
    key = "kfp.tasks_cached" if state == "SUCCEEDED" else "kfp.tasks_not_run"
    assert run.data.tags[key].split(",") == [s.name for s in STAGES]  # nothing ran in this test


@pytest.mark.parametrize("uri", ["", "data/raw", "/nonexistent/raw"])
def test_raw_uri_check_names_the_parameter(uri: str):
    """What the first task of a run started from the UI with the defaults (raw_uri "") says."""
    from pipeline.run_record import check_raw_uri

    with pytest.raises(SystemExit, match="pipeline parameter raw_uri"):
        check_raw_uri(uri)
    check_raw_uri("s3://bucket/raw")
    check_raw_uri(str(RAW_ROOT.resolve()))
