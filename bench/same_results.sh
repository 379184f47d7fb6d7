#!/usr/bin/env bash
# Do two code revisions give the same results on CPU? Runs every stage of each revision on the same
# inputs (the outputs of a finished default run in data/, from `make run`) and compares the outputs:
# bytes for data files, tensors for models, arrays for dca.npz. train_teacher and distill run one
# epoch (from the same prepared data, teacher and pruned model), the rest as configured.
# Prints one line per output and writes bench/results/same_results.json.
#
#   bench/same_results.sh OLD_REV [NEW_REV]      (NEW_REV defaults to the working tree)
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/same_results.sh OLD_REV [NEW_REV]}
NEW=${2:-}
REPO=$PWD
PY=$REPO/.venv/bin/python
[ -f data/teacher/model.pt ] && [ -f data/dca/dca.npz ] || { echo "run the default pipeline first (make run)"; exit 1; }
W=$(mktemp -d -t cdc-same-results-XXXX)
trap 'git -C "$REPO" worktree remove --force "$W/old-code" 2>/dev/null || true;
      [ -n "$NEW" ] && git -C "$REPO" worktree remove --force "$W/new-code" 2>/dev/null || true' EXIT
git worktree add -q --detach "$W/old-code" "$OLD"
if [ -n "$NEW" ]; then git worktree add -q --detach "$W/new-code" "$NEW"; NEWCODE=$W/new-code; else NEWCODE=$REPO; fi
export DVC_NO_ANALYTICS=1 MLFLOW_TRACKING_URI=sqlite:///$W/mlflow.db
printf 'train_teacher: {epochs: 1}\ndistill: {epochs: 1}\n' > "$W/params.yaml"
D=$REPO/data
for who in old new; do
  code=$([ $who = old ] && echo "$W/old-code" || echo "$NEWCODE")
  O=$W/$who; mkdir -p "$O"
  run() { (cd "$W" && PYTHONPATH=$code "$PY" -m components.cli "$@" --params params.yaml >> "$O/log" 2>&1); }
  echo "running the stages of the $who code ($code)"
  run train_teacher --prepared "$D/prepared" --model "$O/teacher.pt" --history "$O/teacher_history.csv" \
    --metrics "$O/teacher_metrics.json" --checkpoints "$O/checkpoints"
  run dump_stats --prepared "$D/prepared" --teacher "$D/teacher/model.pt" --stats "$O/stats.parquet" \
    --grid "$O/grid.parquet" --confusion "$O/confusion.json"
  run score --stats "$D/stats/stats.parquet" --grid "$D/stats/grid.parquet" --confusion "$D/stats/confusion.json" \
    --prepared "$D/prepared" --teacher "$D/teacher/model.pt" --scores "$O/scores.parquet" --groups "$O/groups.json"
  run prune --prepared "$D/prepared" --teacher "$D/teacher/model.pt" --scores "$D/score/scores.parquet" \
    --model "$O/pruned.pt" --report "$O/prune_report.json"
  run fit_dca --prepared "$D/prepared" --teacher "$D/teacher/model.pt" --pruned "$D/prune/model.pt" \
    --groups "$D/score/groups.json" --dca "$O/dca.npz"
  run distill --prepared "$D/prepared" --teacher "$D/teacher/model.pt" --pruned "$D/prune/model.pt" \
    --dca "$D/dca/dca.npz" --model "$O/student.pt" --history "$O/student_history.csv" --metrics "$O/student_metrics.json"
done
"$PY" - "$W" "$OLD" "${NEW:-working tree}" <<'PY'
import hashlib, json, sys
from datetime import date
from pathlib import Path
import numpy as np, torch
w, old, new = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def same(name):
    a, b = w / "old" / name, w / "new" / name
    if name.endswith(".pt"):
        x, y = (torch.load(p, weights_only=True) for p in (a, b))
        return x["widths"] == y["widths"] and all(torch.equal(v, y["state_dict"][k]) for k, v in x["state_dict"].items())
    if name.endswith(".npz"):
        x, y = np.load(a), np.load(b)
        return x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)
    return hashlib.md5(a.read_bytes()).digest() == hashlib.md5(b.read_bytes()).digest()
names = sorted(p.name for p in (w / "old").iterdir() if p.is_file() and p.name != "log")
result = {n: same(n) for n in names}
for n, ok in result.items():
    print(f"{n:24s} {'identical' if ok else 'DIFFERENT'}")
out = Path("bench/results/same_results.json")
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps({"date": date.today().isoformat(), "old": old, "new": new, "identical": result}, indent=2) + "\n")
sys.exit(0 if all(result.values()) else 1)
PY
