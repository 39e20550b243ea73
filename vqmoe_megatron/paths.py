"""Output locations checked before any work starts (standard library only)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


def file_in_the_way(directory: Union[str, Path]) -> Optional[Path]:
    """The regular file at ``directory`` or at one of its parents, which would keep the
    directory from being made (as root, the usual way that fails, short of a full or read-only
    disk); None when ``directory`` exists or can be made."""
    for candidate in (Path(directory), *Path(directory).parents):
        if candidate.is_dir():
            return None
        if candidate.exists():
            return candidate
    return None
