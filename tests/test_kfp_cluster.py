"""`cdc kfp submit` and `cdc kfp schedule` through the real `kfp.Client`, against a recording stand-in
of the Kubeflow Pipelines REST API on 127.0.0.1 (no cluster can run here): the requests they send (with
the caller's credentials), and the one-line errors for an unreachable endpoint, a silent one, refused
or missing credentials, a login page, a backend too old, a bad cron and a bad override."""

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
    """Answers the few v2beta1 calls kfp.Client makes and records every request (and its headers).

    `version` is what its health check reports (as the backend's healthz handler does: commit_sha,
    tag_name, multi_user); with `token` set it answers 401 to a request without that bearer token, as
    an authenticating proxy does; with `login` it redirects every API call to an HTML login page, as
    oauth2-proxy/Dex do for a browser session that has none."""

    requests: list[tuple[str, str, dict]] = []
    headers_seen: list[dict[str, str]] = []
    version = "2.15.0"
    token: str | None = None
    login = False

    def _authorized(self) -> bool:
        self.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
        if self.login and not self.path.startswith("/login"):
            self.send_response(302)
            self.send_header("Location", "/login?rd=" + self.path)
            self.end_headers()
            return False
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return False
        return True

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
        if self.path.startswith("/login"):
            page = b"<html><body>Log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if not self._authorized():
            return
        self._record()
        if self.path.startswith("/apis/v2beta1/healthz"):
            self._reply({"commit_sha": "abc", "tag_name": self.version, "multi_user": False})
        elif self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiments": []})
        else:
            self._reply({})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
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
    KfpApi.requests, KfpApi.headers_seen = [], []
    KfpApi.version, KfpApi.token, KfpApi.login = "2.15.0", None, False
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
    code = main(["kfp", "submit", "--host", api, "--raw-uri", "s3://b/raw", "--run-name", "nightly"])
    assert code == 0
    body = posted("/apis/v2beta1/runs")
    assert body["display_name"] == "nightly"
    components = body["pipeline_spec"]["pipeline_spec"]["components"]
    assert {"comp-prepare", "comp-evaluate", "comp-close-mlflow-run"} <= set(components)
    # the committed package, cached as compiled, and no checkpoint root without a pipeline root
    assert body["runtime_config"]["parameters"].get("checkpoint_root", "") == ""
    assert "enableCache: false" not in json.dumps(body).replace('"enableCache": false', "enableCache: false")


def test_submit_options_recompile_and_no_cache_turns_off_every_task_cache(api: str, in_repo: None, caplog):
    code = main(
        [
            "kfp",
            "submit",
            "--host",
            api,
            "--raw-uri",
            "s3://b/raw",
            "--pipeline-root",
            "s3://b/runs",
            "--gpus",
            "2",
            "--toleration",
            "nvidia.com/gpu:NoSchedule",
            "--image",
            "registry.example.com/cdc:latest",
            "--no-cache",
        ]
    )
    assert code == 0
    body = posted("/apis/v2beta1/runs")
    spec = body["pipeline_spec"]["pipeline_spec"]
    distill = spec["deploymentSpec"]["executors"]["exec-distill"]["container"]
    assert distill["resources"]["accelerator"]["resourceCount"] == "2"
    assert distill["image"] == "registry.example.com/cdc:latest"
    assert "is a tag, not a digest" in caplog.text  # a mutable tag is warned about
    platform = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]
    assert (
        platform["deploymentSpec"]["executors"]["exec-distill"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    )
    handler = next(c for n, c in spec["components"].items() if n.startswith("comp-exit-handler"))
    caching = [t.get("cachingOptions", {}).get("enableCache") for t in handler["dag"]["tasks"].values()]
    assert caching and not any(caching)
    assert body["runtime_config"]["parameters"]["checkpoint_root"] == "s3://b/runs/checkpoints"


def test_the_token_travels_in_the_header_only(api: str, in_repo: None, tmp_path, caplog, capsys):
    KfpApi.token = "sentinel-bearer-token-9c1f"
    token_file = tmp_path / "token"
    token_file.write_text(KfpApi.token + "\n")
    code = main(["kfp", "submit", "--host", api, "--raw-uri", "s3://b/raw", "--token-file", str(token_file)])
    assert code == 0
    assert all(h.get("authorization") == f"Bearer {KfpApi.token}" for h in KfpApi.headers_seen)
    assert {p for m, p, _ in KfpApi.requests} >= {"/apis/v2beta1/healthz", "/apis/v2beta1/runs"}
    out = capsys.readouterr()
    for where in (json.dumps(KfpApi.requests), caplog.text, out.out, out.err):
        assert "sentinel-bearer" not in where


def test_a_token_from_the_environment_and_a_session_cookie_are_sent(
    api: str, in_repo: None, monkeypatch: pytest.MonkeyPatch
):
    KfpApi.token = "env-token"
    monkeypatch.setenv("CDC_KFP_TOKEN", "env-token")
    code = main(
        ["kfp", "submit", "--host", api, "--raw-uri", "s3://b/raw", "--cookies", "authservice_session=s1"]
    )
    assert code == 0
    assert all(h.get("cookie") == "authservice_session=s1" for h in KfpApi.headers_seen)


@pytest.mark.parametrize("given", [[], ["--token", "wrong"]])
def test_missing_or_refused_credentials_are_one_line(api: str, in_repo: None, caplog, given: list[str]):
    KfpApi.token = "right"
    code = main(["kfp", "submit", "--host", api, "--raw-uri", "s3://b/raw", *given])
    assert code == 2
    _one_line_error(
        caplog, "401", "needs credentials" if not given else "refused the credentials from --token"
    )
    assert "wrong" not in caplog.text
    assert KfpApi.requests == []


def test_a_login_page_instead_of_the_api_is_one_line(api: str, in_repo: None, caplog):
    KfpApi.login = True
    code = main(["kfp", "submit", "--host", api, "--raw-uri", "s3://b/raw"])
    assert code == 2
    _one_line_error(caplog, "login page", "/login")


@pytest.mark.parametrize("version", ["2.14.3", "1.8.5", "v2.5.0"])
def test_an_older_backend_is_refused_before_anything_is_created(api: str, in_repo: None, caplog, version):
    KfpApi.version = version
    code = main(["kfp", "schedule", "--host", api, "--raw-uri", "s3://b/raw", "--cron", "0 3 * * *"])
    assert code == 2
    _one_line_error(caplog, f"backend {version}", "2.15.0 or later")
    assert [m for m, _, _ in KfpApi.requests] == ["GET"]  # the health check, nothing else


def test_a_newer_or_unreported_backend_is_accepted(api: str, in_repo: None, caplog):
    for version, warned in (("2.16.1", False), ("unknown", True)):
        KfpApi.version = version
        caplog.clear()
        assert main(["kfp", "submit", "--host", api, "--raw-uri", "s3://b/raw"]) == 0
        assert ("does not report its version" in caplog.text) is warned


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


def test_in_a_pod_the_projected_service_account_token_is_used(
    api: str, in_repo: None, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    """Inside the cluster: the endpoint from $KF_PIPELINES_ENDPOINT (no --host), the credential the
    service-account token Kubernetes projects (kfp's path variable), read by kfp at each request."""
    KfpApi.token = "projected-sa-token"
    token = tmp_path / "token"
    token.write_text("projected-sa-token")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", api)
    monkeypatch.delenv("CDC_KFP_TOKEN", raising=False)
    assert main(["kfp", "submit", "--raw-uri", "s3://b/raw"]) == 0
    assert posted("/apis/v2beta1/runs")["display_name"].startswith("cdc-")
