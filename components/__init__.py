"""Pipeline stages: one module per stage under stages/ (paths in, paths out) beside the stage list
(stages/__init__.py), and what every stage shares: the stage CLI, the runner, MLflow tracking, checkpoints
and the resumable epoch loop."""
