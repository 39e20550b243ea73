"""Patches to megatron-core's and torch's distributed-checkpoint I/O: no helper process left
behind by a save, no code run by a load.

1. megatron-core 0.16.1 ``dist_checkpointing/strategies/filesystem_async.py``
   (``_get_write_results_queue``) starts a ``spawn`` ``multiprocessing.Manager()`` server on the
   first save, for a results queue, and never stops it; with it comes multiprocessing's resource
   tracker. Both outlive a training run killed with SIGKILL (about 270 MB resident, holding the
   run's log open). This project saves synchronously, so the queue is only filled and read in the
   saving process: a thread-safe ``queue.Queue`` does, and no process is started.
2. torch 2.13 ``distributed/checkpoint/filesystem.py`` (``FileSystemReader.read_metadata``) reads
   a checkpoint's ``.metadata`` with plain ``pickle.load``, and ``default_planner.py``
   (``DefaultLoadPlanner.load_bytes``) reads non-tensor items (megatron's ``_extra_state``) with
   ``torch.load(weights_only=False)``: a tampered checkpoint would run its code. The metadata is
   read by an unpickler that only builds the checkpoint-metadata types; byte items with
   ``weights_only=True``. megatron's reader (``CachedMetadataFileSystemReader``) and planner
   (``MCoreLoadPlanner``) inherit both methods.

Upstream issue: none filed for either at the time of writing. :func:`apply_checkpoint_io_patches`
is idempotent; the checkpoint code calls it before every save and load.
"""

from __future__ import annotations

import io
import pickle
import queue

import torch
from torch.distributed.checkpoint import FileSystemReader, Metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

METADATA_GLOBALS = frozenset(
    {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        *(
            ("torch.distributed.checkpoint.planner", name)
            for name in ("SavePlan", "TensorWriteData", "WriteItem", "WriteItemType")
        ),
    }
)
"""The globals a checkpoint's ``.metadata`` pickle may name (besides torch dtypes)."""

_APPLIED = False


class UnsafeCheckpointFile(pickle.UnpicklingError):
    """A checkpoint file whose unpickling would build objects outside the allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the types of :data:`METADATA_GLOBALS` and torch dtypes."""

    def find_class(self, module: str, name: str):
        obj = getattr(torch, name, None) if module == "torch" else None
        if (module, name) in METADATA_GLOBALS or isinstance(obj, torch.dtype):
            return super().find_class(module, name)
        raise UnsafeCheckpointFile(f"it names {module}.{name}, which a checkpoint never holds")


def read_metadata_safely(data: bytes) -> Metadata:
    """Unpickle a ``.metadata`` file's bytes with the allow-list; raises UnsafeCheckpointFile."""
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointFile(f"it holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def _read_metadata(self: FileSystemReader, *args, **kwargs) -> Metadata:
    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as stream:
        metadata = read_metadata_safely(stream.read())
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _load_bytes(self: DefaultLoadPlanner, read_item, value: io.BytesIO) -> None:
    loaded = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
    else:
        self.state_dict[read_item.dest_index.fqn] = loaded


def apply_checkpoint_io_patches() -> None:
    """Apply both patches of the module docstring once."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results: queue.Queue = queue.Queue()
    filesystem_async._get_write_results_queue = lambda: results
    FileSystemReader.read_metadata = _read_metadata
    DefaultLoadPlanner.load_bytes = _load_bytes
    _APPLIED = True
