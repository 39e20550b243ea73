"""GLUE task layer: read the nine tasks' TSV files, score predictions, write submissions.

``tasks`` declares the tasks and reads their files, ``metrics`` scores dev predictions,
``submission`` writes test predictions in the GLUE server's format.
"""

from vqmoe_megatron.glue.metrics import check_predictions, compute_task_metrics
from vqmoe_megatron.glue.submission import read_predictions, write_predictions, write_submission
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
    "read_predictions",
    "read_split",
    "write_predictions",
    "write_submission",
]
