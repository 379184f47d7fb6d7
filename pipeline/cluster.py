"""Submit the compiled pipeline to a Kubeflow Pipelines endpoint, once or on a cron schedule.

Before anything is created the endpoint's health check is read (with the caller's credentials) and a
backend older than `MIN_BACKEND` is refused: the compiled spec uses fields older drivers reject.
Credentials for the endpoint (`Auth`) go in request headers only, never in the spec, a log or an error;
the tasks' own S3 credentials come from a Kubernetes secret (`s3_credentials_secret`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdc.params import Params, validate_params
from pipeline.defaults import COOKIES_ENV, MIN_BACKEND, TOKEN_ENV

log = logging.getLogger("cdc.kfp")

CRON_FIELDS = (  # KFP's cron has a seconds field first: "0 0 3 * * *" is 03:00 every day
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
CRON_NAMES = re.compile(r"^(JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC|SUN|MON|TUE|WED|THU|FRI|SAT)$")
HEALTH_TIMEOUT_S = 5.0
# where Kubernetes projects a service-account token for KFP inside a pod (kfp.client's convention)
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
AUTH_HINT = (
    f"give a bearer token (--token-file, ${TOKEN_ENV} or --token), a session cookie (--cookies or "
    f"${COOKIES_ENV}), or run inside the cluster with a projected service-account token"
)


class ClusterError(RuntimeError):
    """The endpoint or the request is unusable; the message is one line for the user."""


def kfp_cron(expression: str) -> str:
    """Validate a cron expression; a standard 5-field one gets KFP's leading seconds field (`0`)."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ClusterError(
            f"bad cron expression {expression!r}: give 5 fields (minute hour day month weekday) "
            "or KFP's 6 (with seconds first)"
        )
    for value, (name, low, high) in zip(fields, CRON_FIELDS, strict=True):
        for part in value.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                raise ClusterError(f"bad cron expression {expression!r}: step {step!r} in the {name} field")
            if base in ("*", "?"):
                continue
            for bound in base.split("-", 1):
                if CRON_NAMES.match(bound.upper()):
                    continue
                if not bound.isdigit() or not low <= int(bound) <= high:
                    raise ClusterError(
                        f"bad cron expression {expression!r}: {bound!r} in the {name} field "
                        f"(allowed {low}-{high})"
                    )
    return " ".join(fields)


@dataclass(frozen=True)
class Auth:
    """How requests to the endpoint authenticate: a bearer token, a session cookie, a projected
    service-account token file (read by kfp at every request, so the kubelet may rotate it), or none
    (kfp.Client then uses kubeconfig or the in-cluster service account when no host is given)."""

    token: str | None = field(default=None, repr=False)  # a repr or a traceback never shows them
    cookies: str | None = field(default=None, repr=False)
    token_path: str | None = None
    source: str = "none"  # where the credential came from, for messages (never the credential)

    def headers(self) -> dict[str, str]:
        token = self.token or (Path(self.token_path).read_text().strip() if self.token_path else None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.cookies:
            headers["Cookie"] = self.cookies
        return headers

    def client_kwargs(self) -> dict[str, Any]:
        if self.token_path:
            from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

            return {"credentials": ServiceAccountTokenVolumeCredentials(self.token_path)}
        return {"existing_token": self.token, "cookies": self.cookies}


def resolve_auth(
    token: str | None = None, token_file: Path | None = None, cookies: str | None = None
) -> Auth:
    """The first credential given: --token, --token-file, $CDC_KFP_TOKEN, then a cookie (--cookies,
    $CDC_KFP_COOKIES), then a projected service-account token when this runs in a pod that has one."""
    cookies = cookies or os.environ.get(COOKIES_ENV) or None
    if token:
        return Auth(token=token, cookies=cookies, source="--token")
    if token_file:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as err:
            raise ClusterError(f"--token-file {token_file}: {err.strerror}") from None
        if not text:
            raise ClusterError(f"--token-file {token_file} is empty")
        return Auth(token=text, cookies=cookies, source=f"--token-file {token_file}")
    if os.environ.get(TOKEN_ENV):
        return Auth(token=os.environ[TOKEN_ENV], cookies=cookies, source=f"${TOKEN_ENV}")
    if cookies:
        return Auth(cookies=cookies, source="a session cookie")
    projected = os.environ.get(SA_TOKEN_PATH_ENV) or SA_TOKEN_PATH
    if Path(projected).is_file():
        return Auth(token_path=projected, source=f"the service-account token {projected}")
    return Auth()


def parse_version(tag: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a backend tag such as `2.15.0` or `v2.16.0-rc.1`; None when unknown."""
    match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", str(tag or ""))
    return tuple(int(g) for g in match.groups()) if match else None  # type: ignore[return-value]


def require_backend(health: dict[str, Any], host: str) -> str:
    """The backend's version tag, or a one-line refusal when it is older than `MIN_BACKEND`."""
    tag = str(health.get("tag_name") or "unknown")
    version = parse_version(tag)
    floor = ".".join(map(str, MIN_BACKEND))
    if version is None:
        log.warning(
            "Kubeflow Pipelines at %s does not report its version (%r); it must be %s or later",
            host,
            tag,
            floor,
        )
    elif version < MIN_BACKEND:
        raise ClusterError(
            f"Kubeflow Pipelines at {host} runs backend {tag}; this pipeline needs {floor} or later "
            "(its driver rejects the spec's optional secrets); upgrade the backend"
        )
    return tag


def check_endpoint(host: str, auth: Auth = Auth(), timeout: float = HEALTH_TIMEOUT_S) -> dict[str, Any]:
    """The endpoint's health check (with `auth`), or a one-line ClusterError: unreachable, silent,
    refusing the credentials, or answering with something other than KFP's JSON (a login page)."""
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    request = urllib.request.Request(url, headers=auth.headers())  # noqa: S310 - the user's endpoint
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body, final = response.read(), response.geturl()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            given = (
                f"refused the credentials from {auth.source}"
                if auth.source != "none"
                else "needs credentials"
            )
            raise ClusterError(f"Kubeflow Pipelines at {host} {given} ({err.code}): {AUTH_HINT}") from None
        raise ClusterError(f"Kubeflow Pipelines at {host} answered {err.code} on {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ClusterError(f"Kubeflow Pipelines at {host} is unreachable: {reason}") from None
    try:
        health = json.loads(body)
    except ValueError:
        health = None
    if not isinstance(health, dict):
        moved = f" (redirected to {final.split('?')[0]})" if final != url else ""
        raise ClusterError(
            f"Kubeflow Pipelines at {host} answered its health check with a page that is not KFP's JSON"
            f"{moved}: a login page? {AUTH_HINT}"
        )
    return health


def connect(host: str | None, namespace: str | None = None, auth: Auth = Auth()) -> Any:
    """A `kfp.Client` for `host` (None: kfp's own discovery, `$KF_PIPELINES_ENDPOINT`, in-cluster or
    kubeconfig) once the health check and the backend-version floor pass."""
    import kfp

    host = host or os.environ.get("KF_PIPELINES_ENDPOINT") or None
    if host and "://" not in host:  # as kfp.Client does
        host = f"https://{host}"
    where = host or "the endpoint kfp found (in-cluster or kubeconfig)"
    tag = require_backend(check_endpoint(host, auth), where) if host else None
    with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": MIN_BACKEND is later
        warnings.filterwarnings(
            "ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning
        )
        client = kfp.Client(host=host, namespace=namespace or "kubeflow", **auth.client_kwargs())
    if tag is None:  # asked through kfp's own transport and credentials
        try:
            raw = client._healthz_api.get_healthz(_preload_content=False, _request_timeout=HEALTH_TIMEOUT_S)
            health = json.loads(raw.data)
        except Exception as err:  # noqa: BLE001 - any transport error is the same message
            raise ClusterError(
                f"Kubeflow Pipelines at {where} is unusable: {err.__class__.__name__}"
            ) from None
        tag = require_backend(health, where)
    log.info("Kubeflow Pipelines backend %s at %s (credentials: %s)", tag, where, auth.source)
    return client


def set_param(arguments: dict[str, Any], assignment: str) -> None:
    """Apply `section.key=value` (YAML value) to the per-section pipeline arguments in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ClusterError(f"--set expects section.key=value, got {assignment!r}")
    value = yaml.safe_load(raw)
    section, _, field = key.partition(".")
    if section not in arguments:
        raise ClusterError(f"--set {key}: unknown params section {section!r}; known: {', '.join(arguments)}")
    if not field:
        arguments[section] = value
    else:
        if value is None:
            raise ClusterError(f"--set {key}=null: Kubeflow structs cannot hold null; leave the key out")
        arguments[section] = {**arguments[section], field: value}


def run_arguments(params: Params, overrides: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """Pipeline arguments: every params section (nulls left out), `--set` overrides, then `extra`.

    The result is validated against the params schema, so a bad override fails here, not on the cluster.
    """
    args: dict[str, Any] = {
        section: (v.model_dump(exclude_none=True) if hasattr(v, "model_dump") else v)
        for section, v in ((s, getattr(params, s)) for s in Params.model_fields)
    }
    for assignment in overrides:
        set_param(args, assignment)
    validate_params(args, "--set")
    args.update({k: v for k, v in extra.items() if v not in (None, "")})
    return args


@dataclass
class Submission:
    kind: str  # "run" or "recurring run"
    id: str
    url: str


def submit(
    client: Any,
    package: Path,
    arguments: dict[str, Any],
    experiment: str,
    run_name: str,
    pipeline_root: str | None,
) -> Submission:
    result = client.create_run_from_pipeline_package(
        str(package),
        arguments=arguments,
        run_name=run_name,
        experiment_name=experiment,
        pipeline_root=pipeline_root,
    )
    return Submission("run", result.run_id, f"{client._uihost}/#/runs/details/{result.run_id}")


def schedule(
    client: Any,
    package: Path,
    arguments: dict[str, Any],
    experiment: str,
    job_name: str,
    cron: str,
    pipeline_root: str | None,
    max_concurrency: int = 1,
    catchup: bool = False,
) -> Submission:
    exp = client.create_experiment(experiment)
    job = client.create_recurring_run(
        experiment_id=exp.experiment_id,
        job_name=job_name,
        cron_expression=kfp_cron(cron),
        max_concurrency=max_concurrency,
        no_catchup=not catchup,
        params=arguments,
        pipeline_package_path=str(package),
        pipeline_root=pipeline_root,
        enabled=True,
    )
    job_id = job.recurring_run_id
    return Submission("recurring run", job_id, f"{client._uihost}/#/recurringruns/details/{job_id}")


def without_cache(package: Path, out: Path) -> Path:
    """`package` with every task's cache turned off, in the root DAG and in every sub-DAG (the exit
    handler's body): kfp.Client's `enable_caching=False` reaches the root DAG's tasks only."""
    pipeline_spec, *platform = yaml.safe_load_all(package.read_text())
    dags = [pipeline_spec["root"]] + [c for c in pipeline_spec["components"].values() if "dag" in c]
    for dag in dags:
        for task in dag["dag"]["tasks"].values():
            task.setdefault("cachingOptions", {})["enableCache"] = False
    out.write_text(yaml.safe_dump_all([pipeline_spec, *platform], sort_keys=False))
    return out


def describe(submission: Submission) -> str:
    return json.dumps({"kind": submission.kind, "id": submission.id, "url": submission.url})
