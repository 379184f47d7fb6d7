"""Pipeline stages: one module per stage (paths in, paths out), the stage list, the `cdc` CLI, tracking."""
