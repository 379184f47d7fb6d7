"""Submit the compiled pipeline to a Kubeflow Pipelines endpoint, once or on a cron schedule.

Credentials never travel in the request: the tasks read S3 credentials from a Kubernetes secret
(`s3_credentials_secret`) and the endpoint's own authentication comes from the environment
(`KF_PIPELINES_*`, kubeconfig) through `kfp.Client`.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cdc.params import Params, validate_params

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


def check_endpoint(host: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Fail fast, in one line, when the Kubeflow Pipelines API does not answer its health check."""
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - the user's endpoint
            response.read()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):  # up, but needs credentials: kfp.Client will bring them
            return
        raise ClusterError(f"Kubeflow Pipelines at {host} answered {err.code} on {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ClusterError(f"Kubeflow Pipelines at {host} is unreachable: {reason}") from None


def connect(host: str, namespace: str | None = None) -> Any:
    import kfp

    check_endpoint(host)
    with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": said in the README
        warnings.filterwarnings(
            "ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning
        )
        return kfp.Client(host=host, namespace=namespace or "kubeflow")


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


def describe(submission: Submission) -> str:
    return json.dumps({"kind": submission.kind, "id": submission.id, "url": submission.url})
