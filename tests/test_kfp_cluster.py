"""`cdc kfp submit` and `cdc kfp schedule` through the real `kfp.Client`, against a recording stand-in
of the Kubeflow Pipelines REST API on 127.0.0.1 (no cluster can run here): the requests they send,
and the one-line errors for an unreachable endpoint, a silent one, a bad cron and a bad override."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cdc.params import PruneParams
from pipeline.cluster import ClusterError, kfp_cron
from tests.conftest import REPO
from tools.cli import main


class KfpApi(BaseHTTPRequestHandler):
    """Answers the few v2beta1 calls kfp.Client makes and records every request."""

    requests: list[tuple[str, str, dict]] = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.requests.append((self.command, self.path, body))
        return body

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._record()
        if self.path.startswith("/apis/v2beta1/healthz"):
            self._reply({"multi_user": False})
        elif self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiments": []})
        else:
            self._reply({})

    def do_POST(self) -> None:  # noqa: N802
        body = self._record()
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        elif self.path.startswith("/apis/v2beta1/recurringruns"):
            self._reply({**body, "recurring_run_id": "rr-1"})
        elif self.path.startswith("/apis/v2beta1/runs"):
            self._reply({**body, "run_id": "run-1", "experiment_id": "exp-1"})
        else:
            self._reply({})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    KfpApi.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), KfpApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sentinel-secret-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "sentinel-key-id")


def posted(path: str) -> dict:
    (body,) = [b for method, p, b in KfpApi.requests if method == "POST" and p.startswith(path)]
    return body


def test_schedule_sends_the_cron_params_and_pipeline_spec(api: str, in_repo: None):
    code = main(
        [
            "kfp",
            "schedule",
            "--host",
            api,
            "--raw-uri",
            "s3://bucket/cdc/raw",
            "--cron",
            "0 3 * * 1-5",
            "--set",
            "prune.ratio=0.4",
            "--set",
            "runtime.device=cuda",
            "--mlflow-tracking-uri",
            "http://mlflow.mlflow:5000",
            "--pipeline-root",
            "s3://bucket/cdc/runs",
        ]
    )
    assert code == 0
    body = posted("/apis/v2beta1/recurringruns")
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1-5"
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    assert body["mode"] == "ENABLE" and body["experiment_id"] == "exp-1"
    config = body["runtime_config"]
    assert config["pipeline_root"] == "s3://bucket/cdc/runs"
    parameters = config["parameters"]
    # the whole section, nulls left out (KFP structs cannot carry them), with the one override
    expected = {k: v for k, v in PruneParams(ratio=0.4).model_dump().items() if v is not None}
    assert parameters["prune"] == expected
    assert parameters["runtime"]["device"] == "cuda"
    assert parameters["raw_uri"] == "s3://bucket/cdc/raw"
    assert parameters["mlflow_tracking_uri"] == "http://mlflow.mlflow:5000"
    # the spec travels with its Kubernetes platform config (run id from pod metadata, S3 secret)
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "cdc-pipeline"
    kubernetes = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]
    assert "secretAsEnv" in json.dumps(kubernetes) and "fieldPathAsEnv" in json.dumps(kubernetes)
    sent = json.dumps(KfpApi.requests)
    assert "sentinel" not in sent, "a credential from the environment was sent"


def test_submit_runs_the_compiled_package_once(api: str, in_repo: None):
    code = main(
        ["kfp", "submit", "--host", api, "--raw-uri", "s3://b/raw", "--run-name", "nightly", "--gpus", "2"]
    )
    assert code == 0
    body = posted("/apis/v2beta1/runs")
    assert body["display_name"] == "nightly"
    assert body["runtime_config"]["parameters"]["gpu_count"] == 2
    assert body["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"].keys() >= {"prepare", "evaluate"}


def _one_line_error(capsys_or_caplog: pytest.LogCaptureFixture, *fragments: str) -> None:
    errors = [r.getMessage() for r in capsys_or_caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_unreachable_endpoint_fails_fast_with_one_line(in_repo: None, caplog: pytest.LogCaptureFixture):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    code = main(["kfp", "submit", "--host", f"http://127.0.0.1:{port}", "--raw-uri", "s3://b/raw"])
    assert code == 2 and time.perf_counter() - start < 10
    _one_line_error(caplog, "unreachable", f"127.0.0.1:{port}")


def test_endpoint_that_never_answers_times_out_within_ten_seconds(in_repo: None, caplog):
    with socket.socket() as silent:  # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.perf_counter()
        code = main(["kfp", "schedule", "--host", host, "--raw-uri", "s3://b/raw", "--cron", "0 3 * * *"])
        elapsed = time.perf_counter() - start
    assert code == 2 and elapsed < 10
    _one_line_error(caplog, "unreachable")


@pytest.mark.parametrize("cron", ["61 * * * *", "* * *", "0 3 * * MON-XYZ", "*/0 * * * *"])
def test_bad_cron_fails_before_any_request(api: str, in_repo: None, caplog, cron: str):
    code = main(["kfp", "schedule", "--host", api, "--raw-uri", "s3://b/raw", "--cron", cron])
    assert code == 2
    _one_line_error(caplog, "cron")
    assert KfpApi.requests == []


def test_bad_override_names_the_key_before_any_request(api: str, in_repo: None, caplog):
    code = main(["kfp", "submit", "--host", api, "--raw-uri", "s3://b/raw", "--set", "prune.ratio=2"])
    assert code == 2 and "prune.ratio" in caplog.text
    assert KfpApi.requests == []


def test_cron_accepts_standard_and_kfp_forms():
    assert kfp_cron("30 2 * * SUN") == "0 30 2 * * SUN"
    assert kfp_cron("0 0 */6 * * ?") == "0 0 */6 * * ?"
    with pytest.raises(ClusterError, match="hour"):
        kfp_cron("0 25 * * *")
