"""MLflow tracking: what the runs are (identity, plain data), the stage and pipeline runs, and the registry."""
