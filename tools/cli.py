"""`cdc`: the stage commands of `components/cli.py` plus `cdc kfp` (compile, run-local, submit, schedule),
`cdc compare`, `cdc lineage`, `cdc promote`, `cdc storage` and `cdc inspect`.

The console script sits on top so that the arrows keep pointing down: tools/ uses pipeline/ (Kubeflow,
loaded only for `cdc kfp`), components/ and cdc/; none of them imports tools/.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from components import cli as stage_cli
from components.storage import add_storage_parser, run_storage
from tools.compare import add_compare_parser, run_compare
from tools.inspect_model import add_inspect_parser, run_inspect
from tools.lineage import add_lineage_parser, add_promote_parser, run_lineage, run_promote

log = logging.getLogger("cdc.kfp")

KFP_HELP = """Run the pipeline with Kubeflow Pipelines v2: the same stages, code and params as `dvc repro`.

  compile     write the pipeline spec (pipeline/cdc_pipeline.yaml, committed) for the cluster
  run-local   run every component here under kfp.local (subprocess runner, this environment)
  submit      run the pipeline once on a Kubeflow Pipelines endpoint
  schedule    create a recurring run from a cron expression (max concurrency 1, no catch-up)

Every stage's params come from params.yaml (override with --set section.key=value); each task logs a
nested MLflow run under one pipeline run per Kubeflow run (tag kfp.run_id), which an exit task closes.
Where pods go and how big they are (--gpus, --toleration, --node-selector, --shm-gb, timeouts, --image)
is compiled into the spec: give those options to compile, or to submit/schedule, which then recompile.
submit and schedule first read the endpoint's health check and refuse a backend older than {floor}."""

POD_OPTIONS = (
    "image",
    "gpus",
    "accelerator",
    "tolerations",
    "node_selector",
    "shm_gb",
    "gpu_timeout_h",
    "cpu_timeout_h",
    "image_pull_secret",
    "retries",
)
MUTABLE_TAG_WARNING = (
    "image %s is a tag, not a digest: a rebuilt image under the same tag runs with Kubeflow's cache entries "
    "of the old one; give repo@sha256:... (`make image` prints it)"
)


def add_pod_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The compile-time pod settings (`pipeline.dag.PodSettings`); without `defaults` they are None
    when not given (submit/schedule: recompile only if one is)."""
    from pipeline.defaults import DEFAULT_IMAGE
    from pipeline.pods import GPU_RESOURCE, PodSettings

    d = PodSettings()

    def default(value: Any) -> Any:
        return value if defaults else None

    g = p.add_argument_group("pods (compiled into the spec)")
    g.add_argument(
        "--image",
        default=default(DEFAULT_IMAGE),
        help=f"image every task runs in, best by digest: repo@sha256:... (default: {DEFAULT_IMAGE})",
    )
    g.add_argument(
        "--gpus",
        type=int,
        default=default(d.gpus),
        help="GPUs of each multi-process task (train_teacher, dump_stats, fit_dca, distill); the "
        f"one-process model tasks get one, the rest none; CPUs and memory scale with it (default: {d.gpus})",
    )
    g.add_argument(
        "--accelerator", default=default(GPU_RESOURCE), help=f"GPU resource name (default: {GPU_RESOURCE})"
    )
    g.add_argument(
        "--toleration",
        dest="tolerations",
        action="append",
        default=None,
        metavar="KEY[=VALUE]:EFFECT",
        help="a taint of the GPU pool that the GPU tasks tolerate (repeatable), "
        "e.g. nvidia.com/gpu=present:NoSchedule",
    )
    g.add_argument(
        "--node-selector",
        dest="node_selector",
        action="append",
        default=None,
        metavar="LABEL=VALUE",
        help="a node label the GPU tasks require (repeatable), "
        "e.g. cloud.google.com/gke-accelerator=nvidia-l4",
    )
    g.add_argument(
        "--shm-gb",
        type=int,
        default=default(d.shm_gb),
        help=f"memory-backed /dev/shm of GPU tasks, GiB (default: {d.shm_gb})",
    )
    g.add_argument(
        "--gpu-timeout-h",
        type=float,
        default=default(d.gpu_timeout_h),
        help=f"deadline of a GPU task, hours (default: {d.gpu_timeout_h:g})",
    )
    g.add_argument(
        "--cpu-timeout-h",
        type=float,
        default=default(d.cpu_timeout_h),
        help=f"deadline of a CPU task, hours (default: {d.cpu_timeout_h:g})",
    )
    g.add_argument(
        "--image-pull-secret",
        default=None,
        help="Kubernetes secret to pull the image with (private registry)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=default(d.retries),
        help=f"retries of a failed task (an evicted or preempted pod too), {d.retry_backoff_s} s back-off "
        f"doubling; training resumes from its checkpoints (default: {d.retries})",
    )


def pod_settings(args: argparse.Namespace) -> Any:
    """The PodSettings the options give, or None when none was given (submit/schedule keep --package)."""
    from pipeline.cluster import ClusterError
    from pipeline.pods import PodSettings, Toleration

    given = {k: getattr(args, k) for k in POD_OPTIONS if getattr(args, k, None) not in (None, [])}
    if not given and args.kfp_command != "compile":
        return None
    try:
        if "tolerations" in given:
            given["tolerations"] = tuple(Toleration.parse(t) for t in given["tolerations"])
        if "node_selector" in given:
            pairs = [t.partition("=") for t in given["node_selector"]]
            if any(not key or not sep for key, sep, _ in pairs):
                raise ValueError(f"--node-selector {given['node_selector']}: give LABEL=VALUE")
            given["node_selector"] = tuple((key, value) for key, _, value in pairs)
        pods = PodSettings(**given)
    except (TypeError, ValueError) as err:
        raise ClusterError(str(err)) from None
    if "@sha256:" not in pods.image:
        log.warning(MUTABLE_TAG_WARNING, pods.image)
    return pods


def add_kfp_parser(sub: Any) -> None:
    from pipeline.defaults import COMPILED, COOKIES_ENV, MIN_BACKEND, TOKEN_ENV

    kp = sub.add_parser(
        "kfp",
        help="compile, run locally, submit or schedule the Kubeflow pipeline",
        description=KFP_HELP.format(floor=".".join(map(str, MIN_BACKEND))),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ks = kp.add_subparsers(dest="kfp_command", required=True, metavar="SUBCOMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--params", default="params.yaml", type=Path, help="params file (default: %(default)s)"
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one param for this run (repeatable), e.g. --set prune.ratio=0.4",
        )

    c = ks.add_parser("compile", help="write the pipeline spec YAML", description="Write the pipeline spec.")
    c.add_argument("--output", default=COMPILED, type=Path, help="where to write it (default: %(default)s)")
    c.add_argument("--params", default="params.yaml", type=Path, help="defaults of the pipeline parameters")
    add_pod_options(c, defaults=True)

    r = ks.add_parser(
        "run-local",
        help="run the whole pipeline here under kfp.local",
        description="Run every component as a subprocess of this environment (kfp.local SubprocessRunner); "
        "artifacts land under --pipeline-root/<run>/<task>/, MLflow runs in the usual store.",
    )
    common(r)
    r.add_argument(
        "--raw", default=Path("data/raw"), type=Path, help="raw dataset folder (default: %(default)s)"
    )
    r.add_argument(
        "--pipeline-root", default=Path("kfp_outputs"), type=Path, help="artifact root (default: %(default)s)"
    )
    r.add_argument("--cache", action="store_true", help="reuse outputs of identical earlier local tasks")
    r.add_argument(
        "--checkpoint-root",
        default=None,
        help="durable copy of the training checkpoints, resumed by a rerun "
        "(default: <pipeline root>/checkpoints)",
    )

    for name, text in (
        ("submit", "run the pipeline once on a cluster"),
        ("schedule", "create a recurring run on a cluster"),
    ):
        p = ks.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        common(p)
        p.add_argument(
            "--host",
            default=None,
            help="Kubeflow Pipelines API endpoint, e.g. https://kfp.example.com (default: "
            "$KF_PIPELINES_ENDPOINT, else kfp's discovery: the in-cluster service, or kubeconfig's cluster "
            "through its API proxy)",
        )
        p.add_argument("--namespace", default=None, help="Kubeflow namespace (multi-user deployments)")
        a = p.add_argument_group("authentication (never logged, never in the spec)")
        a.add_argument(
            "--token-file", type=Path, default=None, help="file holding a bearer token for the endpoint"
        )
        a.add_argument(
            "--token",
            default=None,
            help="a bearer token (other users see it in the process list: prefer --token-file or "
            f"${TOKEN_ENV})",
        )
        a.add_argument(
            "--cookies",
            default=None,
            help="session cookie(s) of a logged-in browser, e.g. 'authservice_session=...' "
            f"(or ${COOKIES_ENV})",
        )
        p.add_argument("--experiment", default="cdc", help="Kubeflow experiment (default: %(default)s)")
        p.add_argument("--package", default=COMPILED, type=Path, help="compiled spec (default: %(default)s)")
        p.add_argument("--raw-uri", required=True, help="the raw dataset, e.g. s3://bucket/cdc/raw")
        p.add_argument("--pipeline-root", default=None, help="artifact root, e.g. s3://bucket/cdc/runs")
        p.add_argument(
            "--checkpoint-root",
            default=None,
            help="durable storage for the training checkpoints, so that a preempted or retried task resumes "
            "(default: <pipeline root>/checkpoints when --pipeline-root is given)",
        )
        p.add_argument("--mlflow-tracking-uri", default=None, help="MLflow server the tasks log to")
        p.add_argument(
            "--s3-endpoint-url",
            default=None,
            help="S3-compatible endpoint (MinIO, Ceph) the tasks use for MLflow artifacts and checkpoints",
        )
        p.add_argument(
            "--s3-secret",
            default=None,
            help="Kubernetes secret with the AWS_* keys the tasks use (default: cdc-s3-credentials)",
        )
        p.add_argument(
            "--no-cache",
            action="store_true",
            help="run every task, ignoring Kubeflow's cache of earlier runs",
        )
        add_pod_options(p, defaults=False)
        if name == "submit":
            p.add_argument("--run-name", default=None, help="default: cdc-<date>-<time>")
        else:
            p.add_argument(
                "--cron",
                required=True,
                help="when to run: 5 fields (minute hour day month weekday) or KFP's 6 with seconds first",
            )
            p.add_argument(
                "--name", default="cdc-scheduled", help="recurring run name (default: %(default)s)"
            )
            p.add_argument(
                "--max-concurrency", type=int, default=1, help="runs at once (default: %(default)s)"
            )
            p.add_argument("--catchup", action="store_true", help="run the schedules missed while paused")


def run_kfp(args: argparse.Namespace) -> int:
    from cdc.params import load_params
    from pipeline import cluster
    from pipeline.dag import compile_pipeline

    try:
        pods = pod_settings(args) if args.kfp_command != "run-local" else None
        if args.kfp_command == "compile":
            path = compile_pipeline(args.output, args.params, pods)
            print(f"wrote {path} (image {pods.image})")
            return 0
        params = load_params(args.params)
        if args.kfp_command == "run-local":
            return _run_local(args, params)
        cron = cluster.kfp_cron(args.cron) if args.kfp_command == "schedule" else None
        auth = cluster.resolve_auth(args.token, args.token_file, args.cookies)
        checkpoint_root = args.checkpoint_root or (
            f"{args.pipeline_root.rstrip('/')}/checkpoints" if args.pipeline_root else None
        )
        extra = {
            "raw_uri": args.raw_uri,
            "mlflow_tracking_uri": args.mlflow_tracking_uri,
            "s3_endpoint_url": args.s3_endpoint_url,
            "checkpoint_root": checkpoint_root,
            "s3_credentials_secret": args.s3_secret,
            "mlflow_experiment": args.experiment,
        }
        arguments = cluster.run_arguments(params, args.overrides, extra)
        package = args.package
        if pods is not None:
            package = compile_pipeline(Path(tempfile.mkdtemp()) / "cdc_pipeline.yaml", args.params, pods)
        elif not package.exists():
            raise cluster.ClusterError(f"{package} not found: run `cdc kfp compile` first")
        if args.no_cache:
            package = cluster.without_cache(package, Path(tempfile.mkdtemp()) / "cdc_pipeline_no_cache.yaml")
        client = cluster.connect(args.host, args.namespace, auth)
        if cron is None:
            name = args.run_name or time.strftime("cdc-%Y%m%d-%H%M%S")
            done = cluster.submit(client, package, arguments, args.experiment, name, args.pipeline_root)
        else:
            done = cluster.schedule(
                client,
                package,
                arguments,
                args.experiment,
                args.name,
                cron,
                args.pipeline_root,
                args.max_concurrency,
                args.catchup,
            )
        print(cluster.describe(done))
        return 0
    except cluster.ClusterError as err:
        log.error("%s", err)
        return 2


def _run_local(args: argparse.Namespace, params: Any) -> int:
    from pipeline import cluster
    from pipeline.local import run_local

    arguments = cluster.run_arguments(params, args.overrides, {})
    if not args.raw.exists():
        raise FileNotFoundError(f"raw data folder {args.raw} not found (run `make data`)")
    checkpoint_root = args.checkpoint_root or str((args.pipeline_root / "checkpoints").resolve())
    arguments["checkpoint_root"] = checkpoint_root
    result = run_local(params, args.raw, args.pipeline_root, arguments, cache=args.cache)
    log.info(
        "kfp.local run %s finished in %.0f s; artifacts under %s; MLflow pipeline run %s",
        result.run_id,
        result.seconds,
        result.root,
        result.mlflow_run_id,
    )
    metrics = result.root / "evaluate" / "metrics"
    if metrics.exists():
        stage_cli.summary(metrics, str(args.params))
    return 0


EXTENSIONS: dict[str, stage_cli.Extension] = {
    "kfp": (add_kfp_parser, run_kfp),
    "compare": (add_compare_parser, run_compare),
    "lineage": (add_lineage_parser, run_lineage),
    "promote": (add_promote_parser, run_promote),
    "storage": (add_storage_parser, run_storage),
    "inspect": (add_inspect_parser, run_inspect),
}


def main(argv: list[str] | None = None) -> int:
    return stage_cli.main(argv, EXTENSIONS)


def console() -> NoReturn:
    """The `cdc` console script: `main`, then a quick exit (`components.cli.exit_now`)."""
    stage_cli.exit_now(main())


if __name__ == "__main__":
    console()
