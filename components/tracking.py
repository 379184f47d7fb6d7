"""MLflow tracking for stages: one run per stage, nested under the pipeline run of `cdc repro`.

Every run is tagged with the git commit and the md5 of each input and output, so a reviewer can tie an
MLflow run to the `dvc.lock` entry that produced the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import runpy
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol, TextIO

from cdc.errors import InputError
from components import stage_server

log = logging.getLogger(__name__)

PARENT_ENV = "CDC_PARENT_RUN_ID"
EXPERIMENT_ENV = "CDC_EXPERIMENT"
DEFAULT_EXPERIMENT = "cdc"
# how the md5 tags were computed: runs logged before directories were hashed the DVC way lack the tag
HASH_TAG, HASH_SCHEME = "cdc.hash", "dvc3-md5"
PLATFORM_TAG = "cdc.platform"
CANDIDATE, CHAMPION = "candidate", "champion"  # registry aliases: the newest export, the promoted one


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, or a SQLite file `mlflow.db` in the current directory (the repo root)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking() -> None:
    """Settle where this process tracks, without loading MLflow: the S3 and HTTP client settings into the
    environment (a tracking worker inherits them); a tracking server that does not answer raises
    `TrackingUnavailable` now, before any work (or, with `CDC_TRACKING_FALLBACK=local`, is replaced by
    ./mlflow.db with a warning)."""
    from components.storage import S3Settings, client_env

    s3 = S3Settings.from_env()
    if s3 is not None:
        for key, value in client_env(s3).items():
            os.environ.setdefault(key, value)
    for key, value in HTTP_DEFAULTS.items():  # MLflow's own: 7 retries, minutes per call with no server
        os.environ.setdefault(key, value)
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        problem = server_problem(uri)
        if problem and os.environ.get(FALLBACK_ENV) == "local":
            local = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
            log.warning("MLflow server %s unreachable (%s): logging into %s instead", uri, problem, local)
            os.environ["MLFLOW_TRACKING_URI"] = local
        elif problem:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} unreachable ({problem}); start it, unset MLFLOW_TRACKING_URI "
                f"to track into ./mlflow.db, or set {FALLBACK_ENV}=local to log locally this time"
            )


def setup_mlflow() -> Any:
    """MLflow on `tracking_uri()`, in the experiment `$CDC_EXPERIMENT` (default cdc), created on first
    use with its artifacts on S3 when `CDC_S3_BUCKET` is set (components/storage.py), else next to a
    SQLite store in ./mlartifacts (else the tracking server's default)."""
    import mlflow

    from components.storage import S3Settings

    logging.getLogger("alembic").setLevel(logging.WARNING)
    resolve_tracking()
    s3 = S3Settings.from_env()
    mlflow.set_tracking_uri(tracking_uri())
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        if s3 is not None:
            artifact_location = s3.url("mlflow")
        elif tracking_uri().startswith("sqlite:"):
            artifact_location = (Path.cwd() / "mlartifacts").as_uri()
        mlflow.create_experiment(name, artifact_location=artifact_location)
    elif s3 is not None and not experiment.artifact_location.startswith("s3://"):
        log.warning(
            "experiment %r keeps its artifacts at %s (fixed when it was created); for S3 artifacts use a "
            "new experiment: CDC_EXPERIMENT=<name>",
            name,
            experiment.artifact_location,
        )
    mlflow.set_experiment(name)
    return mlflow


FALLBACK_ENV = "CDC_TRACKING_FALLBACK"
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingUnavailable(InputError):
    """The tracking server cannot be reached: said before any work starts."""


def server_problem(uri: str) -> str | None:
    """Why the MLflow server at `uri` does not answer its health check, or None when it does."""
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=5)
    except requests.RequestException as err:
        return type(err).__name__
    return None if response.ok else f"health check answered HTTP {response.status_code}"


class LostLogging:
    """MLflow calls made after the tracking server went away mid-stage: the first failure is reported,
    later calls are skipped, and the stage still writes its outputs."""

    def __init__(self) -> None:
        self.dropped = 0
        self.first: Exception | None = None

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.first is None:
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # any client or transport error: tracking must not kill training
                self.first = err
                log.warning("MLflow logging failed (%s); the stage goes on without it", _short(err))
        self.dropped += 1
        return None


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def md5(path: str | Path) -> str:
    """The hash `dvc.lock` records for `path`, computed the way DVC 3 computes it, so an MLflow run's
    tags and `dvc.lock` compare as strings.

    A file: the md5 of its bytes. A directory: the md5 of the JSON list of its files' `{"md5", "relpath"}`
    sorted by relative path (dvc_data's `Tree.as_bytes`), with the suffix `.dir`
    (tests/test_lineage.py pins this against the hashes DVC wrote).
    """
    path = Path(path)
    if path.is_dir():
        entries = [
            {"md5": md5(f), "relpath": f.relative_to(path).as_posix()}
            for f in sorted(path.rglob("*"), key=lambda f: f.relative_to(path).as_posix())
            if f.is_file()
        ]
        return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"
    h = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


DVC_WRITTEN = (":(exclude)dvc.lock", ":(exclude)metrics", ":(exclude,glob)**/.gitignore")


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # what DVC itself writes during `dvc repro` (the lock, git-kept metrics) does not dirty the code
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *DVC_WRITTEN],
            capture_output=True,
            text=True,
        )
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        # no git checkout (a container image): the commit the image was built from, if it was recorded
        return os.environ.get("CDC_GIT_COMMIT", "unknown")


def _flatten(prefix: str, obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: obj}


class StageTracker:
    """Per-step metrics for a stage, so stages never import MLflow (`stage_run` logs the outputs)."""

    def __init__(self, run: RunLog) -> None:
        self._run = run

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)  # when measured, not when a tracking worker gets to it
        self._run.log_metrics({k: float(v) for k, v in metrics.items()}, step, now)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._run.set_tags(tags)

    def register_model(
        self, model: Any, name: str, example: Any, example_output: Any, tags: dict[str, str]
    ) -> str:
        """Log `model` on this run (torch.export format, signature from the example) and register it
        as `name` with the alias `candidate`; the version's tags lead back to this run and its lineage.
        MLflow is loaded in this process for it (the model is here), whichever process logs the rest."""
        from contextlib import nullcontext
        from importlib.metadata import version

        from mlflow.models import infer_signature

        mlflow = setup_mlflow()
        active = mlflow.active_run()
        here = active is not None and active.info.run_id == self._run.run_id
        with nullcontext(active) if here else mlflow.start_run(run_id=self._run.run_id) as run:
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                signature=infer_signature(example, example_output),
                input_example=example,
                serialization_format="pt2",
                registered_model_name=name,
                # what serving a torch.export program needs; MLflow's own inference starts a process that
                # imports the model's modules (10 s of the export stage) and lists unrelated packages
                pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "mlflow")],
            )
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(name, CANDIDATE, version)
        lineage = {
            "cdc.run_id": run.info.run_id,
            "cdc.pipeline_run_id": run.data.tags.get("mlflow.parentRunId", ""),
            "cdc.git_commit": git_commit(),
            "cdc.lineage": f"cdc lineage show models:/{name}/{version}",
        }
        for key, value in {**lineage, **tags}.items():
            client.set_model_version_tag(name, version, key, value)
        return version


Outputs = list[tuple[str, str, str]]  # (output name, path, md5) of each output the stage wrote


class RunLog(Protocol):
    """Where a stage's MLflow run is logged from: this process (`LocalRunLog`) or a tracking worker
    process (`WorkerRunLog`); `finish` answers (calls dropped, the first failure) as `LostLogging` saw."""

    run_id: str

    def start(self, name: str, parent: str | None, tags: dict[str, str], params: dict[str, Any]) -> str: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None, timestamp: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str, outputs: Outputs) -> tuple[int, str | None]: ...


class LocalRunLog:
    """A stage's MLflow run logged from this process."""

    def __init__(self) -> None:
        self.mlflow = setup_mlflow()
        self.guard = LostLogging()
        self.run_id = ""

    def start(self, name: str, parent: str | None, tags: dict[str, str], params: dict[str, Any]) -> str:
        self.run_id = self.mlflow.start_run(run_name=name, parent_run_id=parent, tags=tags).info.run_id
        self.guard.call(self.mlflow.log_params, _flatten("", params))
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None, timestamp: int) -> None:
        self.guard.call(self.mlflow.log_metrics, metrics, step=step, timestamp=timestamp)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.guard.call(self.mlflow.set_tags, tags)

    def finish(self, status: str, outputs: Outputs) -> tuple[int, str | None]:
        if status == "FINISHED":
            for name, path, digest in outputs:
                self.guard.call(self.mlflow.set_tag, f"cdc.output.{name}.md5", digest)
                self.guard.call(self.mlflow.set_tag, f"cdc.output.{name}.path", path)
                if Path(path).is_file() and Path(path).stat().st_size < 50 * 2**20:
                    self.guard.call(self.mlflow.log_artifact, path, artifact_path=name)
                elif Path(path).is_dir() and name != "checkpoints":
                    self.guard.call(self.mlflow.log_artifacts, path, artifact_path=name)
        self.guard.call(self.mlflow.end_run, status=status)
        return self.guard.dropped, _short(self.guard.first) if self.guard.first else None


class SilentRunLog:
    """Records nothing: a follower rank's metrics are rank 0's."""

    run_id = ""

    def start(self, name: str, parent: str | None, tags: dict[str, str], params: dict[str, Any]) -> str:
        return ""

    def log_metrics(self, metrics: dict[str, float], step: int | None, timestamp: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: str, outputs: Outputs) -> tuple[int, str | None]:
        return 0, None


class WorkerRunLog:
    """A stage's MLflow run logged by a tracking worker process (`components/tracking_worker.py`).

    Importing MLflow and opening its SQL store costs about 3.5 s on 2 cores, as much as importing torch:
    started first, the worker does it on the other core while the stage imports torch and validates its
    params. The stage waits for the run to be open before its work starts (a tracking error still stops it
    before any work), then hands over metrics and tags as JSON lines without waiting.
    """

    def __init__(self) -> None:
        resolve_tracking()  # an unreachable server fails here, in this process, before the worker starts
        if stage_server.forked():  # MLflow is imported already: a fork of this process starts at once
            self.stdin, self.stdout, self.wait = _fork_worker()
        else:
            # the worker runs this process's code: found through PYTHONPATH, not through the working
            # directory (-P), which may hold another checkout
            code = str(Path(__file__).resolve().parents[1])
            path = os.pathsep.join(filter(None, (code, os.environ.get("PYTHONPATH"))))
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "components.tracking_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
                env={**os.environ, "PYTHONPATH": path},
            )
            assert proc.stdin is not None and proc.stdout is not None
            self.stdin, self.stdout, self.wait = proc.stdin, proc.stdout, proc.wait
        self.run_id = ""

    def _send(self, message: dict[str, Any]) -> None:
        with suppress(BrokenPipeError, ValueError):  # the worker is gone: `finish` reports it
            self.stdin.write(json.dumps(message) + "\n")

    def _answer(self) -> dict[str, Any]:
        line = self.stdout.readline()
        if not line:
            return {"error": f"the MLflow tracking worker exited with status {self.wait()}"}
        return json.loads(line)

    def start(self, name: str, parent: str | None, tags: dict[str, str], params: dict[str, Any]) -> str:
        self._send({"op": "start", "name": name, "parent": parent, "tags": tags, "params": params})
        answer = self._answer()
        if "error" in answer:
            self.close()
            error = InputError if answer.get("input_error") else RuntimeError
            raise error(answer["error"])
        self.run_id = answer["run_id"]
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None, timestamp: int) -> None:
        self._send({"op": "metrics", "metrics": metrics, "step": step, "timestamp": timestamp})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send({"op": "tags", "tags": tags})

    def finish(self, status: str, outputs: Outputs) -> tuple[int, str | None]:
        self._send({"op": "finish", "status": status, "outputs": outputs})
        answer = self._answer()
        self.close()
        if "error" in answer:
            return 1, answer["error"]
        return answer["dropped"], answer["first"]

    def close(self) -> None:
        """Let the worker go (idempotent): unstarted, it exits at once; started, it ends the run KILLED."""
        for pipe in (self.stdin, self.stdout):
            if not pipe.closed:
                with suppress(BrokenPipeError):
                    pipe.close()
        self.wait()


def _fork_worker() -> tuple[TextIO, TextIO, Callable[[], int]]:
    """The tracking worker as a fork of this stage (a child of the stage server, single-threaded yet):
    its stdin and stdout as pipes to this process, and a wait for its exit status."""
    to_worker, from_worker = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(to_worker[0], 0)
            os.dup2(from_worker[1], 1)
            for fd in (*to_worker, *from_worker):
                os.close(fd)
            sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the process's own stdin, for its lifetime)
            runpy.run_module("components.tracking_worker", run_name="__main__")  # ends in os._exit
        finally:
            os._exit(1)
    os.close(to_worker[0])
    os.close(from_worker[1])

    status: list[int] = []

    def wait() -> int:  # as Popen.wait: again and again
        if not status:
            status.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        return status[0]

    return open(to_worker[1], "w", buffering=1), open(from_worker[0]), wait  # noqa: SIM115


def early_run_log() -> WorkerRunLog | None:
    """A tracking worker started now, so that MLflow loads while this process loads torch (`stage_run`
    takes it); None where MLflow is loaded already (Kubeflow tasks, tests): the run is logged in-process."""
    return None if _in_process() else WorkerRunLog()


def _in_process() -> bool:
    """MLflow is loaded already (Kubeflow tasks, in-process callers): the run is logged in this process. A
    stage forked from the stage server has it loaded too, but hands its run to a (forked) worker, which
    outlives a killed stage and ends its run KILLED."""
    return "mlflow" in sys.modules and not stage_server.forked()


@contextmanager
def stage_run(
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    run_log: RunLog | None = None,
) -> Iterator[StageTracker]:
    """One MLflow run for a stage, nested under `parent_run_id` (default: `$CDC_PARENT_RUN_ID`), logged
    by `run_log` (default: in this process when MLflow is loaded, else by a tracking worker)."""
    parent = parent_run_id or os.environ.get(PARENT_ENV) or None
    from cdc.device import float_platform

    tags = {
        "cdc.stage": stage,
        "mlflow.source.git.commit": git_commit(),
        PLATFORM_TAG: float_platform(),  # what a reviewer needs to tell a rounding difference from a change
        HASH_TAG: HASH_SCHEME,
        **(extra_tags or {}),
    }
    tags.update({f"cdc.input.{k}.md5": md5(p) for k, p in inputs.items() if Path(p).exists()})
    tags.update({f"cdc.input.{k}.path": str(p) for k, p in inputs.items()})
    run = run_log or (LocalRunLog() if _in_process() else WorkerRunLog())
    run_id = run.start(stage, parent, tags, params)
    log.info("MLflow run %s (%s)", run_id, stage)
    try:
        yield StageTracker(run)
    except BaseException:
        run.finish("FAILED", [])
        raise
    written = [(name, str(p), md5(p)) for name, p in ((n, Path(p)) for n, p in outputs.items()) if p.exists()]
    dropped, first = run.finish("FINISHED", written)
    if first is not None:
        log.warning(
            "MLflow lost %d logging calls of run %s (first: %s); the stage's outputs are complete, its "
            "MLflow record is not (`cdc lineage verify` will flag it)",
            dropped,
            run_id,
            first,
        )
