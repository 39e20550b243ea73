"""GLUE task layer: read the nine tasks' TSV files (``tasks``), score predictions (``metrics``)."""

from vqmoe_megatron.glue.metrics import check_predictions, compute_task_metrics
from vqmoe_megatron.glue.tasks import (
    TASKS,
    GlueDataError,
    GlueExample,
    GlueSplit,
    GlueTask,
    check_task_files,
    get_task,
    read_split,
)

__all__ = [
    "TASKS",
    "GlueDataError",
    "GlueExample",
    "GlueSplit",
    "GlueTask",
    "check_predictions",
    "check_task_files",
    "compute_task_metrics",
    "get_task",
    "read_split",
]
