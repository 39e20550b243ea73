"""lm-evaluation-harness task definitions shipped with the project (``--include_path`` this
directory); ``python -m vqmoe_megatron.eval_tasks`` prints the directory."""
