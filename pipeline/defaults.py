"""Names the CLI needs before (and without) importing the KFP SDK."""

from pathlib import Path

PIPELINE_NAME = "cdc-pipeline"
DEFAULT_IMAGE = "cdc:0.1.0"  # `make image IMAGE=...` builds it; `cdc kfp compile --image` names yours
COMPILED = Path("pipeline/cdc_pipeline.yaml")
# The oldest Kubeflow Pipelines backend whose driver accepts the compiled spec: `optional` on a
# secret-as-env (KubernetesExecutorConfig.SecretAsEnv) first shipped in 2.15.0; older drivers fail
# every task with `unknown field "optional"` (pipeline/cluster.py checks the server's version).
MIN_BACKEND = (2, 15, 0)
TOKEN_ENV = "CDC_KFP_TOKEN"  # a bearer token for the endpoint (or --token / --token-file)
COOKIES_ENV = "CDC_KFP_COOKIES"  # a session cookie, e.g. "authservice_session=..." (or --cookies)
