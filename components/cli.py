"""`cdc`: one command per pipeline stage, plus `repro` (dvc repro under one MLflow pipeline run),
`summary` and `dvc-yaml`."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, NoReturn

from cdc.errors import PREEMPTED_STATUS, InputError, Preempted
from components.stages import STAGE_BY_NAME, STAGES, Stage, option

log = logging.getLogger("cdc")
EVALUATION = STAGE_BY_NAME["evaluate"].outputs["metrics"]  # the metrics `cdc summary` reads
DESCRIPTION = """Class-Discriminative Compression (CDC) of CNNs, one stage at a time.

Stages in order: {stages}. Each reads its inputs and its params.yaml section(s) and writes only
its outputs. `dvc repro` (or `cdc repro`, which also groups the stage runs under one MLflow run)
runs what is out of date."""


# A command group added on top of the stage commands (e.g. `cdc kfp` from pipeline/): it adds its
# subparser, then runs the parsed arguments and returns the exit status.
Extension = tuple[Callable[[Any], None], Callable[[argparse.Namespace], int]]


def build_parser(extensions: dict[str, Extension] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdc",
        description=DESCRIPTION.format(stages=" -> ".join(s.name for s in STAGES)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
        for name, path in stage.inputs.items():
            if name in stage.param_paths:
                key = stage.param_paths[name]
                p.add_argument(option(name), type=Path, help=f"input {name} (default: params {key}, {path})")
            else:
                p.add_argument(
                    option(name), default=path, type=Path, help=f"input {name} (default: %(default)s)"
                )
        for name, path in stage.outputs.items():
            p.add_argument(
                option(name), default=path, type=Path, help=f"output {name} (default: %(default)s)"
            )
        for flag, text in stage.flags.items():
            p.add_argument(option(flag), action="store_true", help=text)
        if stage.distributed:
            p.add_argument(
                "--nproc",
                default=os.environ.get(NPROC_ENV, "1"),  # checked by process_count, one clear line
                help=f"processes to run the stage as, launched by torchrun: one per GPU, or CPU processes "
                f"with gloo (default: ${NPROC_ENV} or 1; already under torchrun: ignored)",
            )
        p.set_defaults(stage=stage)
    rp = sub.add_parser(
        "repro",
        help="run `dvc repro` as one MLflow pipeline run with a nested run per stage, then print the summary",
        description="Extra arguments are passed to `dvc repro` (e.g. `cdc repro -- --force`).",
    )
    rp.add_argument("dvc_args", nargs=argparse.REMAINDER, help="arguments for dvc repro")
    sp = sub.add_parser("summary", help="print the teacher vs student table of the last evaluation")
    sp.add_argument("--metrics", default=EVALUATION, type=Path, help="default: %(default)s")
    sp.add_argument("--params", default="params.yaml")
    sub.add_parser("dvc-yaml", help="print the dvc.yaml generated from the stage list")
    for add_parser, _ in (extensions or {}).values():
        add_parser(sub)
    return parser


NPROC_ENV = "CDC_NPROC"  # how `dvc repro` runs the distributed stages as several processes


def process_count(text: str) -> int:
    """--nproc or $CDC_NPROC as a number of processes: a whole number >= 1 (0 would quietly run as one)."""
    count = int(text) if text.strip().isdigit() else 0
    if count < 1:
        raise InputError(f"--nproc (or ${NPROC_ENV}) must be a whole number >= 1, got {text!r}")
    return count


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Rerun this command as `nproc` processes on this machine through torchrun (the stage detects
    the launch by torchrun's environment); its exit status."""
    args, skip = [], False
    for a in argv:  # the same command without --nproc
        if not skip and a != "--nproc" and not a.startswith("--nproc="):
            args.append(a)
        skip = a == "--nproc"
    return torchrun(nproc, ["components.cli", *args])


def torchrun(nproc: int, module_args: list[str]) -> int:
    """`python -m <module_args>` as `nproc` processes on this machine (torchrun, standalone rendezvous);
    the exit status. The ranks see CDC_NPROC=1, so none launches again."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", *module_args]
    log.info("launching %d processes: %s", nproc, " ".join(command))
    return subprocess.run(command, env={**os.environ, NPROC_ENV: "1"}).returncode


def run_stage(stage: Stage, args: argparse.Namespace) -> None:
    from cdc import distributed
    from components import stage_server
    from components.tracking import early_run_log

    if stage_server.forked():
        log.debug("forked from the stage server (pid %d)", os.getppid())

    # MLflow loads in a tracking worker while this process loads torch and checks the params
    run_log = None if distributed.is_follower() else early_run_log()
    try:
        from cdc.params import load_params
        from components.runner import execute

        params = load_params(args.params)
        inputs = {name: getattr(args, name) for name in stage.inputs}
        for name, key in stage.param_paths.items():
            if inputs[name] is None:
                inputs[name] = Path(params.get(key))
        outputs = {name: getattr(args, name) for name in stage.outputs}
        flags = {flag: getattr(args, flag) for flag in stage.flags}
        execute(stage, params, inputs, outputs, run_log=run_log, **flags)
    finally:
        if run_log is not None:
            run_log.close()


def repro(dvc_args: list[str]) -> int:
    from components import stage_server

    # started first: it imports the stage code while this process and dvc start
    with stage_server.running(dict(os.environ)) as env:
        from cdc.params import load_params

        load_params("params.yaml")  # a bad params file fails here, before a pipeline run is opened
        return _repro(dvc_args, env)


def _repro(dvc_args: list[str], env: dict[str, str]) -> int:
    from components.tracking import PARENT_ENV, git_commit, setup_mlflow, tracking_uri

    mlflow = setup_mlflow()
    args = [a for a in dvc_args if a != "--"]
    # The stages' `cdc ...` commands and dvc itself come from this interpreter's environment,
    # so `.venv/bin/cdc repro` works without activating the venv.
    bin_dir = str(Path(sys.executable).parent)
    env = dict(env, MLFLOW_TRACKING_URI=tracking_uri(), PATH=bin_dir + os.pathsep + env.get("PATH", ""))
    with mlflow.start_run(
        run_name="pipeline", tags={"cdc.stage": "pipeline", "mlflow.source.git.commit": git_commit()}
    ) as run:
        env[PARENT_ENV] = run.info.run_id
        log.info("MLflow pipeline run %s; running dvc repro %s", run.info.run_id, " ".join(args))
        code, output = _tee([sys.executable, "-m", "dvc", "repro", *args], env)
        mlflow.set_tags({f"cdc.stages.{k}": ",".join(v) for k, v in stage_outcomes(output).items()})
        report = STAGE_BY_NAME["evaluate"].outputs["report"]
        for path in ("dvc.lock", "params.yaml", *METRICS_FILES, report):
            if Path(path).exists():  # under their repository paths: `cdc lineage` reads them back
                mlflow.log_artifact(path, artifact_path=str(Path(path).parent).strip(".") or None)
        if code != 0:
            mlflow.set_tag("cdc.failed", f"dvc repro exited with status {code}")
            mlflow.end_run(status="FAILED")
            return code
        if Path(EVALUATION).exists():
            _log_headline(mlflow, Path(EVALUATION), "params.yaml")
    summary(Path(EVALUATION), "params.yaml")
    return 0


METRICS_FILES = [s.outputs[n] for s in STAGES for n in s.metrics]
# the params a reader compares two pipeline runs by, logged on the pipeline run itself
HEADLINE_PARAMS = (
    "seed",
    "data.dataset",
    "train_teacher.arch",
    "score.criterion",
    "prune.budget",
    "prune.ratio",
    "prune.flops_target",
    "distill.epochs",
    "distill.kd_weight",
    "distill.dca_weight",
)


def _tee(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd`, echoing its output as it comes; return the exit status and the output."""
    lines = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
    return proc.returncode, "".join(lines)


def stage_outcomes(dvc_output: str) -> dict[str, list[str]]:
    """Which stages `dvc repro` ran, restored from its run cache, or skipped as unchanged."""
    import re

    patterns = {
        "ran": r"Running stage '([\w-]+)'",
        "restored": r"Stage '([\w-]+)' is cached - skipping run",
        "skipped": r"Stage '([\w-]+)' didn't change, skipping",
    }
    return {k: re.findall(p, dvc_output) for k, p in patterns.items()}


def _log_headline(mlflow: Any, metrics_path: Path, params_path: str) -> None:
    """Teacher/student accuracy, the FLOPs and params ratios, the speed-ups and the key params on the
    pipeline run: two runs compare in the MLflow UI without opening the nested runs."""
    from cdc.io import read_json
    from cdc.params import load_params

    m = read_json(metrics_path)
    headline = {f"{who}_test_acc": m[who]["test_acc"] for who in ("teacher", "pruned", "student")}
    headline.update({k: v for k, v in m["student_vs_teacher"].items() if isinstance(v, int | float)})
    mlflow.log_metrics({k: float(v) for k, v in headline.items()})
    params = load_params(params_path).model_dump()
    logged = {}
    for key in HEADLINE_PARAMS:
        value: Any = params
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        logged[key] = value
    mlflow.log_params(logged)


def summary(metrics_path: Path, params_path: str) -> None:
    from cdc.io import read_json
    from cdc.params import load_params
    from components.stages.evaluate import summary_table

    if not metrics_path.exists():
        raise InputError(f"{metrics_path} not found: run the pipeline first (`make run`)")
    batch_sizes = load_params(params_path).evaluate.latency_batch_sizes
    print(summary_table(read_json(metrics_path), batch_sizes))


def main(argv: list[str] | None = None, extensions: dict[str, Extension] | None = None) -> int:
    extensions = extensions or {}
    args = build_parser(extensions).parse_args(argv)
    from cdc import distributed

    follower = distributed.is_follower()  # rank 0 speaks for all
    logging.basicConfig(
        level=logging.WARNING if follower else logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command in extensions:
            return extensions[args.command][1](args)
        if args.command == "repro":
            return repro(args.dvc_args)
        if args.command == "summary":
            summary(args.metrics, args.params)
            return 0
        if args.command == "dvc-yaml":
            import yaml

            from components.stages import dvc_yaml

            sys.stdout.write(GENERATED_HEADER + yaml.safe_dump(dvc_yaml(), sort_keys=False, width=120))
            return 0
        args.nproc = process_count(getattr(args, "nproc", "1"))
        from cdc import distributed

        if args.nproc > 1 and not distributed.launched():
            return launch_torchrun(args.nproc, sys.argv[1:] if argv is None else argv)
        run_stage(args.stage, args)
        return 0
    except InputError as err:  # the user's to fix (a bad param or file): one line, the traceback with -v
        log.error("%s", err, exc_info=args.verbose)
        return 2
    except Preempted as stopped:
        log.warning("%s; a checkpoint was saved: rerun to resume", stopped)
        return PREEMPTED_STATUS


GENERATED_HEADER = (
    "# Generated from components/stages/__init__.py by `cdc dvc-yaml > dvc.yaml`; do not edit by hand.\n"
)


def exit_now(status: int) -> NoReturn:
    """Exit with `status` without the interpreter's teardown, which with torch loaded takes 0.6-0.9 s
    on 2 cores, paid by every stage of every `dvc repro`. By now the command has closed and renamed
    everything it wrote; the logs and stdout are flushed here."""
    logging.shutdown()
    with suppress(OSError):  # a closed pipe (`cdc summary | head -1`) has nothing left to flush to
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
