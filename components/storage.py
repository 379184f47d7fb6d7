"""S3 storage for the artifacts: the DVC remote (`cdc storage push | pull`, `make push | pull`) and the
MLflow artifact store, on AWS or any S3-compatible endpoint (MinIO, Ceph, a test server on loopback).

Settings come from the environment only, so no secret can land in a committed file, a param, a log or
an MLflow tag:

  CDC_S3_BUCKET     bucket (required to use S3)
  CDC_S3_PREFIX     key prefix inside it (default: cdc); DVC uses PREFIX/dvc, MLflow PREFIX/mlflow
  CDC_S3_ENDPOINT   endpoint URL of an S3-compatible store (default: AWS's, or AWS_ENDPOINT_URL)
  credentials       boto3's usual chain: AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
                    ~/.aws/credentials, an instance role; DVC and MLflow read the same chain
  AWS_MAX_ATTEMPTS  attempts per request before an error is reported (default here: 3)

The DVC remote is written to `.dvc/config.local` (git-ignored) with its URL and endpoint only.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

REMOTE = "cdc-s3"
DEFAULT_ATTEMPTS = 3


class StorageError(RuntimeError):
    """An S3 problem, told with the endpoint and bucket it concerns."""


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    prefix: str
    endpoint: str | None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> S3Settings | None:
        """The settings, or None when CDC_S3_BUCKET is not set (local storage only)."""
        env = dict(os.environ if env is None else env)
        bucket = env.get("CDC_S3_BUCKET", "").strip()
        if not bucket:
            return None
        endpoint = env.get("CDC_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or None
        return cls(bucket, env.get("CDC_S3_PREFIX", "cdc").strip("/") or "cdc", endpoint)

    def url(self, what: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}/{what}"

    @property
    def where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint or 'the AWS default endpoint'}"


def attempts() -> int:
    return int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_ATTEMPTS))


def client_env(settings: S3Settings) -> dict[str, str]:
    """Environment for boto3 users (DVC, MLflow): bounded retries, and the endpoint for MLflow."""
    env = {
        "AWS_MAX_ATTEMPTS": str(attempts()),
        "AWS_RETRY_MODE": os.environ.get("AWS_RETRY_MODE", "standard"),
    }
    if settings.endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.endpoint
    return env


def check(settings: S3Settings) -> None:
    """Reach the bucket (HEAD, bounded retries) or raise a StorageError that says what is wrong."""
    import boto3
    import botocore.config
    import botocore.exceptions as bce

    config = botocore.config.Config(
        retries={"max_attempts": attempts(), "mode": "standard"}, connect_timeout=5, read_timeout=20
    )
    client = boto3.client("s3", endpoint_url=settings.endpoint, config=config)
    try:
        client.head_bucket(Bucket=settings.bucket)
    except bce.NoCredentialsError:
        raise StorageError(
            f"no AWS credentials for {settings.where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE"
        ) from None
    except (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ReadTimeoutError) as err:
        raise StorageError(
            f"cannot reach {settings.where} after {attempts()} attempts ({err}); check CDC_S3_ENDPOINT"
        ) from None
    except bce.ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket") or status == 404:
            raise StorageError(f"{settings.where} does not exist: create it or fix CDC_S3_BUCKET") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            raise StorageError(
                f"access to {settings.where} denied ({code}): check the credentials and the bucket policy"
            ) from None
        raise StorageError(f"{settings.where}: {err}") from None


def configure_dvc_remote(settings: S3Settings) -> None:
    """Make the S3 prefix this repository's default DVC remote, in `.dvc/config.local` only."""
    dvc = [sys.executable, "-m", "dvc", "remote"]
    _run([*dvc, "add", "--local", "--force", "--default", REMOTE, settings.url("dvc")])
    if settings.endpoint:
        _run([*dvc, "modify", "--local", REMOTE, "endpointurl", settings.endpoint])


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise StorageError(f"{' '.join(cmd[2:])} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def transfer(direction: str, settings: S3Settings, targets: list[str]) -> int:
    """`dvc push` or `dvc pull` through the S3 remote, after checking the bucket can be reached."""
    check(settings)
    configure_dvc_remote(settings)
    env = {**os.environ, **client_env(settings)}
    log.info("dvc %s -r %s (%s, %s)", direction, REMOTE, settings.url("dvc"), settings.where)
    code = subprocess.call([sys.executable, "-m", "dvc", direction, "-r", REMOTE, *targets], env=env)
    if code != 0:
        raise StorageError(
            f"dvc {direction} to {settings.where} failed (exit {code}); see the messages above"
        )
    return 0


STORAGE_HELP = __doc__


def add_storage_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "storage",
        help="push or pull the DVC-tracked artifacts to or from S3 (settings: CDC_S3_* variables)",
        description=STORAGE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ss = p.add_subparsers(dest="storage_command", required=True, metavar="SUBCOMMAND")
    ss.add_parser("check", help="reach the bucket, or say what is wrong (endpoint, bucket, credentials)")
    for name, text in (("push", "upload the DVC cache of"), ("pull", "download and check out")):
        sp = ss.add_parser(name, help=f"{text} the pipeline's outputs (dvc {name})")
        sp.add_argument("targets", nargs="*", help="stages or outputs (default: all)")


def run_storage(args: argparse.Namespace) -> int:
    settings = S3Settings.from_env()
    try:
        if settings is None:
            raise StorageError("CDC_S3_BUCKET is not set: S3 storage is off (see `cdc storage --help`)")
        if args.storage_command == "check":
            check(settings)
            print(f"OK: {settings.where} reachable; DVC remote {settings.url('dvc')}")
            return 0
        return transfer(args.storage_command, settings, args.targets)
    except StorageError as err:
        log.error("%s", err)
        return 2
