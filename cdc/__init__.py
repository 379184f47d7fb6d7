"""cdc: the CDC library (models, data, statistics, discriminants, pruning, DCA, training loops).

Pure computation: no MLflow, DVC or Kubeflow imports; nothing printed.
"""
