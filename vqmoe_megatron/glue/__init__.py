"""GLUE task layer: read the nine tasks' TSV files (``tasks``)."""

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
    "check_task_files",
    "get_task",
    "read_split",
]
