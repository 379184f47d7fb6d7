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
nested MLflow run under one pipeline run per Kubeflow run (tag kfp.run_id)."""


def add_kfp_parser(sub: Any) -> None:
    from pipeline.defaults import COMPILED, DEFAULT_IMAGE

    kp = sub.add_parser(
        "kfp",
        help="compile, run locally, submit or schedule the Kubeflow pipeline",
        description=KFP_HELP,
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
    c.add_argument(
        "--image", default=DEFAULT_IMAGE, help="image every component runs in (default: %(default)s)"
    )
    c.add_argument("--params", default="params.yaml", type=Path, help="defaults of the pipeline parameters")

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

    for name, text in (
        ("submit", "run the pipeline once on a cluster"),
        ("schedule", "create a recurring run on a cluster"),
    ):
        p = ks.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        common(p)
        p.add_argument(
            "--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. https://kfp.example.com"
        )
        p.add_argument("--namespace", default=None, help="Kubeflow namespace (multi-user deployments)")
        p.add_argument("--experiment", default="cdc", help="Kubeflow experiment (default: %(default)s)")
        p.add_argument("--package", default=COMPILED, type=Path, help="compiled spec (default: %(default)s)")
        p.add_argument("--image", default=None, help="recompile for this image instead of using --package")
        p.add_argument("--raw-uri", required=True, help="the raw dataset, e.g. s3://bucket/cdc/raw")
        p.add_argument("--pipeline-root", default=None, help="artifact root, e.g. s3://bucket/cdc/runs")
        p.add_argument("--mlflow-tracking-uri", default=None, help="MLflow server the tasks log to")
        p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint for MLflow artifacts")
        p.add_argument("--gpus", type=int, default=None, help="GPUs per model-running task (default: 1)")
        p.add_argument("--s3-secret", default=None, help="Kubernetes secret with AWS_* keys for the tasks")
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
        if args.kfp_command == "compile":
            path = compile_pipeline(args.output, args.params, args.image)
            print(f"wrote {path} (image {args.image})")
            return 0
        params = load_params(args.params)
        if args.kfp_command == "run-local":
            return _run_local(args, params)
        cron = cluster.kfp_cron(args.cron) if args.kfp_command == "schedule" else None
        extra = {
            "raw_uri": args.raw_uri,
            "mlflow_tracking_uri": args.mlflow_tracking_uri,
            "s3_endpoint_url": args.s3_endpoint_url,
            "gpu_count": args.gpus,
            "s3_credentials_secret": args.s3_secret,
            "mlflow_experiment": args.experiment,
        }
        arguments = cluster.run_arguments(params, args.overrides, extra)
        package = args.package
        if args.image:
            package = compile_pipeline(
                Path(tempfile.mkdtemp()) / "cdc_pipeline.yaml", args.params, args.image
            )
        elif not package.exists():
            raise cluster.ClusterError(f"{package} not found: run `cdc kfp compile` first")
        client = cluster.connect(args.host, args.namespace)
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
