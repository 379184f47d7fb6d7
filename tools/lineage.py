"""`cdc lineage show | diff | verify`: where a model came from, what changed between two runs, and
whether the workspace is what the records say.

Three records are joined: `dvc.lock` (per stage: the command, params, input and output hashes), MLflow
(per stage run: when, on which git commit, the hashes of what it read and wrote, and the pipeline run
that logged the `dvc.lock` it produced) and git (the code). The join key is the content hash: the
stage runs tag each output with the hash DVC records for it (`components.tracking.md5`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from cdc.errors import InputError
from components.stages import CODE_PACKAGES, STAGES
from components.tracking import HASH_SCHEME, HASH_TAG, PLATFORM_TAG

LOCK = "dvc.lock"
CODE_DIRS = tuple(f"{package}/" for package in CODE_PACKAGES)
PARAMS = "params.yaml"
METRICS_FILES = [s.outputs[n] for s in STAGES for n in s.metrics]
RUN_ID = re.compile(r"^[0-9a-f]{32}$")

DESCRIPTION = """Audit what produced an artifact and what changed between runs.

  show TARGET     the chain of stages that produced TARGET, back to the raw data: an artifact path
                  (data/student/model.pt), a registered model (models:/cdc-student@candidate) or an
                  MLflow run id (a stage run, or a pipeline run: its whole DAG)
  diff A B        params, artifact hashes, rerun stages, metric deltas and code changes between two
                  runs: git revisions, DVC experiment names, MLflow pipeline run ids or `workspace`
  verify          rehash every output against dvc.lock, check params.yaml against what ran, and check
                  the MLflow runs against the dvc.lock records; exit 1 on any mismatch

MLflow is read from MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db in this directory)."""


class LineageError(InputError):
    """A target or revision that cannot be resolved, with what was tried."""


# ----------------------------------------------------------------------------------------------
# dvc.lock


def lock_stages(text: str | None) -> dict[str, Any]:
    """A dvc.lock's stages in the stage list's order (DVC appends a stage new to an existing dvc.lock at
    its end; a stage the list no longer has stays, after the others)."""
    stages = (yaml.safe_load(text) or {}).get("stages", {}) if text else {}
    order = {s.name: i for i, s in enumerate(STAGES)}
    return dict(sorted(stages.items(), key=lambda item: order.get(item[0], len(order))))


def outs(entry: dict[str, Any]) -> dict[str, str]:
    return {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}


def deps(entry: dict[str, Any]) -> dict[str, str]:
    return {d["path"]: d.get("md5", "") for d in entry.get("deps", [])}


def data_deps(entry: dict[str, Any]) -> dict[str, str]:
    """A stage's inputs but the code it runs (which dvc.yaml lists as dependencies too)."""
    return {p: h for p, h in deps(entry).items() if not p.startswith(CODE_DIRS)}


def code_deps(entry: dict[str, Any]) -> dict[str, str]:
    return {p: h for p, h in deps(entry).items() if p.startswith(CODE_DIRS)}


def stage_params(entry: dict[str, Any]) -> dict[str, Any]:
    """The params a stage ran with, flattened to dotted keys (`distill.temperature`)."""
    return flatten(entry.get("params", {}).get(PARAMS, {}))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        flat: dict[str, Any] = {}
        for k, v in obj.items():
            flat.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {prefix: obj}


def producer(lock: dict[str, Any], path: str) -> str | None:
    """The stage whose output is `path` or a directory holding it."""
    path = path.rstrip("/")
    for name, entry in lock.items():
        for out in outs(entry):
            if path == out or path.startswith(out.rstrip("/") + "/"):
                return name
    return None


def upstream(lock: dict[str, Any], stage: str) -> list[str]:
    """`stage` and every stage it depends on, in the lock's (topological) order."""
    needed, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        todo.extend(p for d in deps(lock[name]) if (p := producer(lock, d)) is not None)
    return [name for name in lock if name in needed]


# ----------------------------------------------------------------------------------------------
# MLflow


@dataclass
class RunInfo:
    run_id: str
    stage: str
    start: str
    commit: str
    status: str
    parent: str | None
    outputs: dict[str, str]  # path -> md5 as the run recorded them
    platform: str | None = None  # CPU, kernel path and torch build (cdc.device.float_platform)


class Runs:
    """The stage runs of the MLflow experiment, indexed by what they wrote."""

    def __init__(self) -> None:
        import os

        from components.tracking import setup_mlflow

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per lookup
        self.mlflow = setup_mlflow()
        self.client = self.mlflow.MlflowClient()
        experiment = self.mlflow.get_experiment_by_name(_experiment_name())
        found = self.client.search_runs([experiment.experiment_id], max_results=50000) if experiment else []
        self.runs = [_run_info(r) for r in found if "cdc.stage" in r.data.tags]
        self._locks: dict[str, dict[str, Any]] = {}

    def producing(self, stage: str, recorded: dict[str, str]) -> list[RunInfo]:
        """Finished runs of `stage` that recorded exactly these output hashes (newest first)."""
        hits = [
            r
            for r in self.runs
            if r.stage == stage
            and r.status == "FINISHED"
            and any(p in r.outputs for p in recorded)
            and all(r.outputs.get(p, md5) == md5 for p, md5 in recorded.items())
        ]
        return sorted(hits, key=lambda r: r.start, reverse=True)

    def get(self, run_id: str) -> RunInfo:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        raise LineageError(f"no cdc run {run_id} in MLflow experiment {_experiment_name()!r}")

    def logged_lock(self, run_id: str) -> dict[str, Any]:
        """The dvc.lock a pipeline run logged when its `dvc repro` ended ({} if none)."""
        if not run_id:
            return {}
        if run_id not in self._locks:
            self._locks[run_id] = lock_stages(self.artifact_text(run_id, LOCK))
        return self._locks[run_id]

    def artifact_text(self, run_id: str, path: str) -> str | None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=path, dst_path=tmp
                )
            except Exception:  # noqa: BLE001 - an artifact the run did not log
                return None
            return Path(local).read_text()


def _experiment_name() -> str:
    import os

    from components.tracking import DEFAULT_EXPERIMENT, EXPERIMENT_ENV

    return os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)


def _run_info(run: Any) -> RunInfo:
    tags = run.data.tags
    paths = {k[len("cdc.output.") : -len(".path")]: v for k, v in tags.items() if k.startswith("cdc.output.")}
    recorded = {
        path: tags[f"cdc.output.{name}.md5"]
        for name, path in paths.items()
        if f"cdc.output.{name}.md5" in tags and tags.get(f"cdc.output.{name}.path") == path
    }
    if tags.get(HASH_TAG) != HASH_SCHEME:
        recorded = {p: mapped for p, h in recorded.items() if (mapped := _from_legacy(p, h)) is not None}
    return RunInfo(
        run_id=run.info.run_id,
        stage=tags["cdc.stage"],
        start=datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        commit=tags.get("mlflow.source.git.commit", "unknown"),
        status=run.info.status,
        parent=tags.get("mlflow.parentRunId"),
        outputs=recorded,
        platform=tags.get(PLATFORM_TAG),
    )


@cache
def _directory_hashes(path: str) -> tuple[str, str] | None:
    """(the pre-dvc3 hash cdc tagged runs with, DVC's hash) of a directory in the workspace."""
    import hashlib

    from components.tracking import md5

    root = Path(path)
    if not root.is_dir():
        return None
    h = hashlib.md5()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}:{md5(f)}\n".encode())
    return h.hexdigest(), md5(root)


def _from_legacy(path: str, recorded: str) -> str | None:
    """A hash from a run logged before runs carried DVC's hashes (no `cdc.hash` tag): a file's as is;
    a directory's as DVC's hash when it matches the directory on disk, else None (not comparable)."""
    if not Path(path).is_dir():
        return recorded
    hashes = _directory_hashes(path)
    return hashes[1] if hashes and hashes[0] == recorded else None


# ----------------------------------------------------------------------------------------------
# show


@dataclass
class StageRecord:
    stage: str
    cmd: str
    params: dict[str, Any]
    inputs: dict[str, str]
    outputs: dict[str, str]
    code: dict[str, str] = field(default_factory=dict)  # the code files it ran -> md5 (dvc.lock)
    run_id: str | None = None
    start: str | None = None
    commit: str | None = None
    platform: str | None = None


@dataclass
class Trace:
    target: str
    lock_from: str  # where the dvc.lock that the chain is read from came from
    sources: dict[str, str]  # inputs no stage produced (the raw data) -> hash
    stages: list[StageRecord] = field(default_factory=list)


def show(target: str, runs: Runs | None = None, lock_path: Path = Path(LOCK)) -> Trace:
    runs = runs or Runs()
    stage, lock, lock_from = _resolve_target(target, runs, lock_path)
    chain = list(lock) if stage is None else upstream(lock, stage)
    sources = {p: h for name in chain for p, h in data_deps(lock[name]).items() if producer(lock, p) is None}
    trace = Trace(target, lock_from, sources)
    for name in chain:
        entry = lock[name]
        record = StageRecord(
            name, _cmd(entry), stage_params(entry), data_deps(entry), outs(entry), code_deps(entry)
        )
        found = runs.producing(name, record.outputs)
        if found:
            run = found[0]
            record.run_id, record.start, record.commit, record.platform = (
                run.run_id,
                run.start,
                run.commit,
                run.platform,
            )
        trace.stages.append(record)
    return trace


def _cmd(entry: dict[str, Any]) -> str:
    return " ".join(entry["cmd"]) if isinstance(entry.get("cmd"), list) else str(entry.get("cmd", ""))


def _resolve_target(target: str, runs: Runs, lock_path: Path) -> tuple[str | None, dict[str, Any], str]:
    """(stage to trace from or None for the whole DAG, the dvc.lock to read the chain from, where that
    lock came from)."""
    if target.startswith("models:/"):
        target = _model_run(target, runs)
    if RUN_ID.match(target):
        run = runs.get(target)
        if run.stage == "pipeline":
            lock = runs.logged_lock(run.run_id)
            if not lock:
                raise LineageError(f"pipeline run {target} logged no dvc.lock (did dvc repro fail?)")
            return None, lock, f"dvc.lock logged by pipeline run {run.run_id}"
        for source, lock in (
            (f"dvc.lock logged by pipeline run {run.parent}", runs.logged_lock(run.parent or "")),
            (f"{lock_path} in the workspace", lock_stages(_read(lock_path))),
        ):
            if run.stage in lock and all(outs(lock[run.stage]).get(p) == h for p, h in run.outputs.items()):
                return run.stage, lock, source
        raise LineageError(
            f"run {target} ({run.stage}) recorded outputs that no known dvc.lock holds: "
            "it did not run under DVC, or its record was altered (`cdc lineage verify` says more)"
        )
    lock = lock_stages(_read(lock_path))
    if not lock:
        raise LineageError(f"{lock_path} not found or empty: run the pipeline first (`make run`)")
    stage = producer(lock, target)
    if stage is None:
        known = ", ".join(p for e in lock.values() for p in outs(e))
        raise LineageError(
            f"{target!r} is no stage output in {lock_path}, no registered model (models:/name@alias) "
            f"and no MLflow run id; outputs are: {known}"
        )
    return stage, lock, f"{lock_path} in the workspace"


def _model_run(uri: str, runs: Runs) -> str:
    """The run that logged a registered model version: models:/name@alias or models:/name/version."""
    spec = uri.removeprefix("models:/")
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = runs.client.get_model_version_by_alias(name, alias)
        else:
            name, number = spec.rsplit("/", 1)
            version = runs.client.get_model_version(name, number)
    except Exception as err:  # noqa: BLE001 - MLflow raises one exception type for every lookup miss
        raise LineageError(f"{uri}: {err}") from None
    return version.run_id


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def format_trace(trace: Trace) -> str:
    lines = [f"{trace.target}: {len(trace.stages)} stages (chain read from {trace.lock_from})", ""]
    for path, md5 in trace.sources.items():
        lines.append(f"source  {path}  {md5}")
    for r in trace.stages:
        lines += ["", f"{r.stage}"]
        if r.run_id:
            lines.append(f"  MLflow run  {r.run_id}  {r.start}  code {r.commit}")
            if r.platform:
                lines.append(f"  platform    {r.platform}")
        else:
            lines.append("  MLflow run  none recorded these outputs")
        lines.append(f"  cmd         {r.cmd}")
        params = " ".join(f"{k}={_short(v)}" for k, v in r.params.items())
        lines.append(f"  params      {params}")
        lines += [f"  in          {p}  {h}" for p, h in r.inputs.items()]
        lines += [f"  out         {p}  {h}" for p, h in r.outputs.items()]
        if r.code:
            lines.append(f"  code        {len(r.code)} files, their md5 in dvc.lock (`--json` lists them)")
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def mermaid(trace: Trace) -> str:
    """A Mermaid flowchart: artifacts as rounded nodes, stages as boxes labelled with their run."""
    ids: dict[str, str] = {}

    def node(path: str) -> str:
        if path not in ids:
            ids[path] = f"a{len(ids)}"
        return ids[path]

    lines = ["flowchart LR"]
    for path, md5 in trace.sources.items():
        lines.append(f'  {node(path)}(["{path}<br/>{md5[:8]}"])')
    for r in trace.stages:
        run = f"<br/>run {r.run_id[:8]}" if r.run_id else ""
        lines.append(f'  s_{r.stage}["{r.stage}{run}"]')
        for p in r.inputs:
            lines.append(f"  {node(p)} --> s_{r.stage}")
        for p, md5 in r.outputs.items():
            lines.append(f'  s_{r.stage} --> {node(p)}(["{p}<br/>{md5[:8]}"])')
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# diff


@dataclass
class Snapshot:
    """One pipeline run's records: from a git revision, a DVC experiment, an MLflow pipeline run or
    the workspace."""

    label: str
    kind: str
    commit: str | None
    lock: dict[str, Any]
    metrics: dict[str, Any]
    platforms: list[str] = field(default_factory=list)  # of its stage runs (MLflow pipeline runs only)


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def snapshot(ref: str, runs: Runs | None = None) -> Snapshot:
    if ref == "workspace":
        from components.tracking import git_commit

        metrics = {p: json.loads(Path(p).read_text()) for p in METRICS_FILES if Path(p).exists()}
        return Snapshot(ref, "workspace", git_commit(), lock_stages(_read(Path(LOCK))), metrics)
    if RUN_ID.match(ref):
        runs = runs or Runs()
        run = runs.get(ref)
        if run.stage != "pipeline":
            raise LineageError(f"run {ref} is a {run.stage} stage run; diff takes pipeline runs")
        metrics = {}
        for p in METRICS_FILES:
            text = runs.artifact_text(ref, p)
            if text is not None:
                metrics[p] = json.loads(text)
        platforms = sorted({r.platform for r in runs.runs if r.parent == ref and r.platform})
        return Snapshot(ref, "MLflow pipeline run", run.commit, runs.logged_lock(ref), metrics, platforms)
    rev = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").stdout.strip()
    kind = "git revision"
    if not rev:
        rev, kind = _experiment_commit(ref), "DVC experiment"
    lock = lock_stages(_git("show", f"{rev}:{LOCK}").stdout)
    metrics = {}
    for p in METRICS_FILES:
        shown = _git("show", f"{rev}:{p}")
        if shown.returncode == 0:
            metrics[p] = json.loads(shown.stdout)
    return Snapshot(ref, kind, rev, lock, metrics)


def _experiment_commit(name: str) -> str:
    """The commit of DVC experiment `name`, resolved as DVC does: an experiment of the current commit
    first, else the only experiment of that name; several on other baselines are ambiguous."""
    lines = _git("for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/").stdout.split("\n")
    refs = dict(line.split() for line in lines if line.strip())
    matches = {r: c for r, c in refs.items() if r.endswith("/" + name) and r.count("/") == 4}
    head = _git("rev-parse", "HEAD").stdout.strip()
    on_head = [c for r, c in matches.items() if r == f"refs/exps/{head[:2]}/{head[2:]}/{name}"]
    if on_head:
        return on_head[0]
    if len(matches) == 1:
        return next(iter(matches.values()))
    if not matches:
        raise LineageError(
            f"{name!r} is no git revision, DVC experiment, MLflow pipeline run id or `workspace`"
        )
    listed = ", ".join(
        f"{c[:7]} (baseline {r.split('/')[2]}{r.split('/')[3][:5]})" for r, c in matches.items()
    )
    raise LineageError(
        f"experiment name {name!r} is ambiguous: {listed}; give the experiment's commit instead"
    )


@dataclass
class Diff:
    a: str
    b: str
    params: dict[str, tuple[Any, Any]]
    artifacts: dict[str, tuple[str | None, str | None]]
    stages_rerun: list[str]
    metrics: dict[str, tuple[float | None, float | None, float | None]]
    code: list[str] | None  # files touched between the commits; None when a commit is unknown
    # per stage, the code files it runs whose md5 differs between the two dvc.lock files
    code_per_stage: dict[str, list[str]] = field(default_factory=dict)
    # stages that read the same inputs with the same params yet wrote different bytes: expected for
    # timings (evaluate), across CPUs or kernel paths (`platforms`) and on CUDA without
    # runtime.deterministic; on one CPU platform anything else is a finding
    same_inputs_other_outputs: list[str] = field(default_factory=list)
    platforms: tuple[list[str], list[str]] = ([], [])  # the stage runs' platforms of A and B, if known


def diff(a: Snapshot, b: Snapshot) -> Diff:
    pa, pb = _all_params(a.lock), _all_params(b.lock)
    params = {k: (pa.get(k), pb.get(k)) for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)}
    oa = {p: h for e in a.lock.values() for p, h in outs(e).items()}
    ob = {p: h for e in b.lock.values() for p, h in outs(e).items()}
    artifacts = {
        p: (oa.get(p), ob.get(p)) for p in [*oa, *(p for p in ob if p not in oa)] if oa.get(p) != ob.get(p)
    }
    rerun = [
        name
        for name in [*a.lock, *(n for n in b.lock if n not in a.lock)]
        if a.lock.get(name) != b.lock.get(name)
    ]
    ma = {f"{f}:{k}": v for f, m in a.metrics.items() for k, v in flatten(m).items() if _number(v)}
    mb = {f"{f}:{k}": v for f, m in b.metrics.items() for k, v in flatten(m).items() if _number(v)}
    metrics = {
        k: (ma.get(k), mb.get(k), (mb[k] - ma[k]) if k in ma and k in mb else None)
        for k in sorted(set(ma) | set(mb))
        if ma.get(k) != mb.get(k)
    }
    unstable = [
        name
        for name in rerun
        if name in a.lock
        and name in b.lock
        and deps(a.lock[name]) == deps(b.lock[name])
        and stage_params(a.lock[name]) == stage_params(b.lock[name])
    ]
    code, platforms = _files_touched(a, b), (a.platforms, b.platforms)
    per_stage = {
        name: changed
        for name in rerun
        if name in a.lock and name in b.lock and (changed := _code_changed(a.lock[name], b.lock[name]))
    }
    return Diff(a.label, b.label, params, artifacts, rerun, metrics, code, per_stage, unstable, platforms)


def _code_changed(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The code dependencies (dvc.yaml lists what each stage runs) whose md5 differs between two runs."""
    da, db = deps(a), deps(b)
    return sorted(p for p in set(da) | set(db) if p.startswith(CODE_DIRS) and da.get(p) != db.get(p))


def _all_params(lock: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for entry in lock.values():
        flat.update(stage_params(entry))
    return flat


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _files_touched(a: Snapshot, b: Snapshot) -> list[str] | None:
    commits = [(s.commit or "").removesuffix("-dirty") for s in (a, b)]
    if not all(c and c != "unknown" for c in commits):
        return None
    out = _git("diff", "--name-only", *commits)
    if out.returncode != 0:
        return None
    files = out.stdout.split()
    for s, c in zip((a, b), commits, strict=True):
        if s.kind == "workspace":  # uncommitted edits are code changes too
            files += _git("diff", "--name-only", c).stdout.split()
    # params are listed above and outputs under artifacts; DVC's own files are no code either
    return sorted(
        f
        for f in set(files)
        if f not in (LOCK, PARAMS)
        and not f.startswith(".dvc/")
        and producer(a.lock, f) is None
        and producer(b.lock, f) is None
    )


def format_diff(d: Diff) -> str:
    lines = [f"lineage diff {d.a} -> {d.b}", ""]
    lines.append(f"params changed ({len(d.params)})")
    lines += [f"  {k}: {_short(va)} -> {_short(vb)}" for k, (va, vb) in d.params.items()]
    lines.append(f"stages rerun ({len(d.stages_rerun)}): {', '.join(d.stages_rerun) or 'none'}")
    for name, files in d.code_per_stage.items():
        lines.append(f"  {name} runs changed code: {', '.join(files)}")
    pa, pb = d.platforms
    if pa and pb and pa != pb:
        lines.append(f"platform: {'; '.join(pa)} -> {'; '.join(pb)}")
        lines.append("  (another CPU or kernel path: trained weights, and so what follows them, may differ)")
    if d.same_inputs_other_outputs:
        lines.append(
            "same inputs and params, other outputs (timings; another CPU or kernel path; "
            "CUDA without runtime.deterministic): " + ", ".join(d.same_inputs_other_outputs)
        )
    lines.append(f"artifacts changed ({len(d.artifacts)})")
    lines += [f"  {p}: {ha or '-'} -> {hb or '-'}" for p, (ha, hb) in d.artifacts.items()]
    lines.append(f"metrics changed ({len(d.metrics)})")
    for k, (va, vb, delta) in d.metrics.items():
        change = f"{delta:+.6g}" if delta is not None else "n/a"
        lines.append(f"  {k}: {va} -> {vb} ({change})")
    if d.code is None:
        lines.append("code: a commit is unknown, cannot list the files touched")
    else:
        lines.append(f"code: {len(d.code)} files touched" + "".join(f"\n  {f}" for f in d.code))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# verify


@dataclass
class Finding:
    kind: str  # missing | modified | params | source | untracked | record
    where: str
    detail: str


def verify(
    runs: Runs | None = None, lock_path: Path = Path(LOCK), params_path: Path = Path(PARAMS)
) -> tuple[list[Finding], str]:
    """Every mismatch between the workspace, dvc.lock and MLflow; and a one-line account of what was
    checked."""
    from components.tracking import md5

    runs = runs or Runs()
    lock = lock_stages(_read(lock_path))
    if not lock:
        raise LineageError(f"{lock_path} not found or empty: nothing to verify (run the pipeline first)")
    current = flatten(yaml.safe_load(params_path.read_text()) or {}) if params_path.exists() else {}
    findings: list[Finding] = []
    hashed = 0
    for name, entry in lock.items():
        for path, recorded in outs(entry).items():
            if not Path(path).exists():
                findings.append(Finding("missing", path, f"output of {name} is gone (dvc.lock: {recorded})"))
                continue
            hashed += 1
            if (actual := md5(path)) != recorded:
                findings.append(
                    Finding("modified", path, f"output of {name}: dvc.lock {recorded}, on disk {actual}")
                )
        for key, value in stage_params(entry).items():
            if current.get(key, "<absent>") != value:
                findings.append(
                    Finding(
                        "params",
                        f"{PARAMS}:{key}",
                        f"{name} ran with {value!r}, {PARAMS} now says {current.get(key, '<absent>')!r} "
                        "(edited without a rerun: `dvc repro`)",
                    )
                )
        for path, recorded in deps(entry).items():
            if producer(lock, path) is None and Path(path).exists() and (actual := md5(path)) != recorded:
                used = "ran" if path.startswith(CODE_DIRS) else "read"  # code edited since, or data changed
                findings.append(Finding("source", path, f"{name} {used} {recorded}, on disk {actual}"))
        if not runs.producing(name, outs(entry)):
            findings.append(
                Finding(
                    "untracked", name, "no finished MLflow run recorded the outputs dvc.lock holds for it"
                )
            )
    findings += _records_matching_no_lock(runs, lock)
    checked = (
        f"{hashed} outputs of {len(lock)} stages rehashed against {lock_path}; params checked against "
        f"{params_path}; {len(runs.runs)} MLflow runs checked against the dvc.lock records"
    )
    return findings, checked


def _records_matching_no_lock(runs: Runs, lock: dict[str, Any]) -> list[Finding]:
    """Stage runs whose recorded outputs (at the pipeline's paths) appear in no dvc.lock: the
    workspace's, any committed or experiment revision's, or the one their pipeline run logged."""
    tracked = {p for e in lock.values() for p in outs(e)}
    known = {(p, h) for e in lock.values() for p, h in outs(e).items()}
    revisions = _git("log", "--all", "--format=%H", "--", LOCK).stdout.split()
    for rev in revisions:
        known |= {
            (p, h)
            for e in lock_stages(_git("show", f"{rev}:{LOCK}").stdout).values()
            for p, h in outs(e).items()
        }
    findings = []
    for run in runs.runs:
        if run.stage == "pipeline" or run.status != "FINISHED":
            continue
        recorded = {(p, h) for p, h in run.outputs.items() if p in tracked}
        unknown = recorded - known
        if unknown and run.parent:
            logged = runs.logged_lock(run.parent)
            unknown -= {(p, h) for e in logged.values() for p, h in outs(e).items()}
        for path, md5 in sorted(unknown):
            findings.append(
                Finding(
                    "record", f"MLflow run {run.run_id}", f"{run.stage} recorded {path} {md5}, in no dvc.lock"
                )
            )
    return findings


def format_findings(findings: list[Finding], checked: str) -> str:
    if not findings:
        return f"OK: {checked}"
    lines = [f"{len(findings)} problem(s):"]
    lines += [f"  [{f.kind}] {f.where}: {f.detail}" for f in findings]
    lines.append(checked)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def add_lineage_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lineage",
        help="trace an artifact to its raw data, diff two runs, verify the workspace against its records",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls = p.add_subparsers(dest="lineage_command", required=True, metavar="SUBCOMMAND")
    s = ls.add_parser("show", help="the stages that produced an artifact, model or run")
    s.add_argument("target", help="artifact path, models:/name@alias or MLflow run id")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--mermaid", action="store_true", help="a Mermaid flowchart")
    d = ls.add_parser("diff", help="what changed between two runs")
    d.add_argument("a", help="git revision, DVC experiment, MLflow pipeline run id or `workspace`")
    d.add_argument("b", nargs="?", default="workspace", help="default: %(default)s")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    v = ls.add_parser("verify", help="rehash outputs and check dvc.lock, params.yaml and MLflow agree")
    v.add_argument("--json", action="store_true", help="machine-readable output")


def run_lineage(args: argparse.Namespace) -> int:
    try:
        if args.lineage_command == "show":
            trace = show(args.target)
            print(
                json.dumps(asdict(trace), indent=2)
                if args.json
                else mermaid(trace)
                if args.mermaid
                else format_trace(trace)
            )
            return 0
        if args.lineage_command == "diff":
            runs = Runs() if any(RUN_ID.match(r) for r in (args.a, args.b)) else None
            result = diff(snapshot(args.a, runs), snapshot(args.b, runs))
            print(json.dumps(asdict(result), indent=2) if args.json else format_diff(result))
            return 0
        findings, checked = verify()
        if args.json:
            print(
                json.dumps(
                    {"ok": not findings, "checked": checked, "findings": [asdict(f) for f in findings]},
                    indent=2,
                )
            )
        else:
            print(format_findings(findings, checked))
        return 1 if findings else 0
    except LineageError as err:
        print(f"cdc lineage: {err}")
        return 2


def add_promote_parser(sub: argparse._SubParsersAction) -> None:
    from components.tracking import CANDIDATE, CHAMPION

    p = sub.add_parser(
        "promote",
        help=f"move the registry alias @{CHAMPION} to a model version (default: the @{CANDIDATE})",
        description=f"Point models:/NAME@{CHAMPION} at a registered student version: by default the one "
        f"aliased @{CANDIDATE} (the newest export). Prints the version it replaced.",
    )
    p.add_argument("--name", default=None, help="registered model (default: params.yaml export.model_name)")
    p.add_argument("--version", default=None, help=f"version to promote (default: the @{CANDIDATE})")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")


def run_promote(args: argparse.Namespace) -> int:
    from cdc.params import load_params
    from components.tracking import CANDIDATE, CHAMPION, setup_mlflow

    name = args.name or load_params(args.params).export.model_name
    client = setup_mlflow().MlflowClient()
    try:
        version = args.version or client.get_model_version_by_alias(name, CANDIDATE).version
        client.get_model_version(name, version)
    except Exception as err:  # noqa: BLE001 - MLflow raises one exception type for every lookup miss
        print(f"cdc promote: {err}")
        return 2
    try:
        previous = client.get_model_version_by_alias(name, CHAMPION).version
    except Exception:  # noqa: BLE001 - no champion yet
        previous = None
    client.set_registered_model_alias(name, CHAMPION, version)
    print(f"models:/{name}@{CHAMPION} -> version {version}" + (f" (was {previous})" if previous else ""))
    return 0
