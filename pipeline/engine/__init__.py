"""The engine: recipe, DAG, runner, artifact store, stage contract, checkpoints, logs. No ML imports at module level."""
