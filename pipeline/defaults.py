"""Names the CLI needs before (and without) importing the KFP SDK."""

from pathlib import Path

PIPELINE_NAME = "cdc-pipeline"
DEFAULT_IMAGE = "cdc:0.1.0"  # `make image IMAGE=...` builds it; `cdc kfp compile --image` names yours
COMPILED = Path("pipeline/cdc_pipeline.yaml")
