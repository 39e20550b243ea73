"""Print the directory of the project's lm-eval tasks (for ``lm_eval --include_path``)."""

from pathlib import Path

print(Path(__file__).resolve().parent)
