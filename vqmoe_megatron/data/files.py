"""Small file helpers: checksums and atomic writes (temp name, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Union

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.paths import file_in_the_way

_BLOCK = 1 << 20


def require_output_dir(option: str, directory: Union[str, Path]) -> None:
    """Refuse, before any work, an output directory that a file keeps from being made."""
    blocking = file_in_the_way(directory)
    if blocking is not None:
        raise DataError(
            f"{option} {directory}: {blocking} is a file, not a directory; choose another {option}"
        )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(path: Path, data: Union[bytes, memoryview]) -> None:
    """Write ``data`` to ``path`` through ``path.tmp`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (see ``write_bytes_atomic``)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))
