"""What the pipeline costs besides the work: a cached `dvc repro`, and per stage the time outside its body.

In a temporary copy of the repository (git + DVC, the tiny params profile of the tests) the pipeline runs
once; then a cached `dvc repro` and `cdc repro` (which adds the MLflow pipeline run and the summary) are
timed, and every stage's command from dvc.yaml is rerun alone, twice: in a process of its own (as `dvc
repro` runs it) and forked from a stage server (as `cdc repro` runs it: components/stage_server.py). Its
wall time is split into the stage body (`timing.stage_s`, logged by components.runner) and the rest:
process start, imports, params validation, MLflow run set-up, input/output hashing and artifact logging.
`import torch` alone is timed too: a stage in its own process cannot start faster than that (MLflow loads
in a tracking worker meanwhile: components/tracking.py). Targets: cached `dvc repro` <= 1 s; per stage
under `cdc repro`, overhead <= 2 s; in its own process, overhead beyond `import torch` <= 2 s. Writes
bench/results/pipeline_overhead.json.

    python -m bench.pipeline_overhead [--repeats 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import markdown_table, reported, stage_seconds, target, write_result
from cdc.params import load_params
from components import stage_server
from components.stages import STAGES
from tests.workspace import REPO, make_workspace

COLUMNS = (
    "wall_s",
    "body_s",
    "overhead_s",
    "beyond_torch_s",
    "wall_forked_s",
    "body_forked_s",
    "overhead_forked_s",
)


def sh(args: list[str] | str, cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, shell=isinstance(args, str), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        env = make_workspace(ws, REPO / "data" / "raw")
        t_first = sh(["cdc", "repro"], ws, env)
        cached = {
            "dvc repro": statistics.median(sh(["dvc", "repro"], ws, env) for _ in range(args.repeats)),
            "dvc status": statistics.median(sh(["dvc", "status"], ws, env) for _ in range(args.repeats)),
            "cdc repro": statistics.median(sh(["cdc", "repro"], ws, env) for _ in range(args.repeats)),
            "python -c pass": statistics.median(
                sh([sys.executable, "-c", "pass"], ws, env) for _ in range(3)
            ),
            "import dvc.repo": statistics.median(
                sh([sys.executable, "-c", "import dvc.repo"], ws, env) for _ in range(3)
            ),
            # the floor under every stage: torch, imported and nothing else
            "import torch": statistics.median(
                sh([sys.executable, "-c", "import torch"], ws, env) for _ in range(3)
            ),
            "import mlflow": statistics.median(
                sh([sys.executable, "-c", "import mlflow"], ws, env) for _ in range(3)
            ),
        }
        params = load_params(ws / "params.yaml")
        commands = {  # dvc.yaml's commands, its ${param} templates filled in as DVC fills them
            name: re.sub(r"\$\{([\w.]+)\}", lambda m: str(params.get(m.group(1))), stage["cmd"])
            for name, stage in yaml.safe_load((ws / "dvc.yaml").read_text())["stages"].items()
        }
        stages = []
        with stage_server.running(env) as served:
            # the server's imports, once per `cdc repro` while DVC starts: waited for by the first stage only
            first_forked = sh(commands[STAGES[0].name], ws, served)
            for stage in STAGES:
                row: dict = {"stage": stage.name}
                for suffix, run_env in (("", env), ("_forked", served)):
                    walls, bodies = [], []
                    for _ in range(args.repeats):
                        walls.append(sh(commands[stage.name], ws, run_env))
                        bodies.append(stage_seconds(ws / "mlflow.db", stage.name))
                    wall, body = statistics.median(walls), statistics.median(bodies)
                    row |= {
                        f"wall{suffix}_s": wall,
                        f"body{suffix}_s": body,
                        f"overhead{suffix}_s": wall - body,
                    }
                row["beyond_torch_s"] = row["overhead_s"] - cached["import torch"]
                stages.append(row)
    print(f"first run of the tiny pipeline: {t_first:.1f} s\n")
    print(
        markdown_table(["fully cached / reference", "seconds"], [[k, f"{v:.2f}"] for k, v in cached.items()])
    )
    print(
        "\n"
        + markdown_table(
            [
                "stage (alone, tiny profile)",
                "own process: wall (s)",
                "body (s)",
                "overhead (s)",
                "beyond import torch (s)",
                "forked (`cdc repro`): wall (s)",
                "body (s)",
                "overhead (s)",
            ],
            [[s["stage"], *(f"{s[k]:.2f}" for k in COLUMNS)] for s in stages],
        )
    )
    worst = max(stages, key=lambda s: s["overhead_s"])
    worst_beyond = max(stages, key=lambda s: s["beyond_torch_s"])
    worst_forked = max(stages, key=lambda s: s["overhead_forked_s"])
    write_result(
        "pipeline_overhead",
        {"first_run_s": t_first, "cached": cached, "stages": stages, "first_forked_s": first_forked},
        [
            target("fully cached dvc repro (s)", cached["dvc repro"], "<=", 1.0),
            target(
                "largest per-stage overhead under cdc repro, forked from the stage server (s)",
                worst_forked["overhead_forked_s"],
                "<=",
                2.0,
                worst_forked["stage"],
            ),
            target(
                "largest per-stage overhead beyond import torch (s)",
                worst_beyond["beyond_torch_s"],
                "<=",
                2.0,
                worst_beyond["stage"],
            ),
            reported(
                "largest per-stage overhead in its own process, import torch included (s)",
                worst["overhead_s"],
                worst["stage"],
            ),
            reported("fully cached cdc repro (s)", cached["cdc repro"]),
            reported(
                f"first forked stage ({STAGES[0].name}) right after the server started (s)", first_forked
            ),
            reported("import torch: the floor under any stage (s)", cached["import torch"]),
            reported("import mlflow: loaded by the tracking worker meanwhile (s)", cached["import mlflow"]),
        ],
        "python -m bench.pipeline_overhead " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
