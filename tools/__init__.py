"""Tools on top of the pipeline that need no Kubeflow: the `cdc` console script (tools/cli.py), `cdc compare`
(matched-budget comparison of methods), `cdc lineage` and `cdc promote` (audit and registry)."""
