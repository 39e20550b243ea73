"""The on-disk shard format: plain WebDataset tars of token samples.

A shard ``{split}-{index:06d}.tar`` holds one member per sample, named ``{n:010d}.tokens.npy``
where ``n`` is the sample's index within its split; the member is a 1-D ``.npy`` array of
``seq_length + 1`` token ids (uint16 or uint32). Headers are written with fixed owner, mode and
mtime, so the same data always gives byte-identical shards (and the same sha256). ``tar``,
``numpy.load`` and ``webdataset`` read them without this package.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Container, Iterator
from functools import lru_cache
from typing import Optional

import numpy as np
from webdataset.tariterators import tar_file_iterator

from vqmoe_megatron.data.errors import DataError
from vqmoe_megatron.data.store import ShardStore

SAMPLE_SUFFIX = "tokens.npy"
_TAR_BLOCK = 512


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def member_name(sample_index: int) -> str:
    return f"{sample_index:010d}.{SAMPLE_SUFFIX}"


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every id: uint16 up to 65536 pieces, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@lru_cache(maxsize=8)
def _npy_header(sample_length: int, dtype: str) -> bytes:
    """The .npy header of a 1-D little-endian array of ``sample_length`` ids (same for all)."""
    buf = io.BytesIO()
    array = np.zeros(sample_length, dtype=np.dtype(dtype).newbyteorder("<"))
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()[: -array.nbytes]


def member_bytes(sample_length: int, dtype: str) -> int:
    """Bytes one sample takes in a tar: header block plus the .npy payload padded to 512."""
    payload = len(_npy_header(sample_length, dtype)) + sample_length * np.dtype(dtype).itemsize
    return _TAR_BLOCK + -(-payload // _TAR_BLOCK) * _TAR_BLOCK


@lru_cache(maxsize=8)
def _tar_header_template(size: int) -> tuple[np.ndarray, int]:
    """The USTAR header ``tarfile`` writes for a member of ``size`` bytes (mode 644, owner 0,
    mtime 0) with an empty name and blank checksum [512] uint8, and that header's checksum."""
    info = tarfile.TarInfo("")
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    header = np.frombuffer(info.tobuf(format=tarfile.USTAR_FORMAT), dtype=np.uint8).copy()
    header[148:156] = ord(" ")
    return header, int(header.sum())


def _digits(values: np.ndarray, count: int, base: int) -> np.ndarray:
    """ASCII digits [n, count] of ``values`` [n] in ``base``, zero-padded on the left."""
    powers = base ** np.arange(count - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers % base + ord("0")).astype(np.uint8)


def shard_tar(samples: np.ndarray, first_index: int) -> memoryview:
    """The tar file of ``samples`` [n, seq_length + 1], numbered from ``first_index``: exactly
    what ``tarfile`` (USTAR) writes, built in one array instead of member by member, and
    returned without copying (file writes and hashlib take the memoryview as is)."""
    npy = np.frombuffer(_npy_header(samples.shape[1], samples.dtype.name), dtype=np.uint8)
    payload = samples.astype(samples.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    size = len(npy) + payload.shape[1]
    header, checksum = _tar_header_template(size)
    suffix = np.frombuffer(f".{SAMPLE_SUFFIX}".encode("ascii"), dtype=np.uint8)
    names = _digits(np.arange(first_index, first_index + len(samples), dtype=np.int64), 10, 10)
    members = len(samples) * member_bytes(samples.shape[1], samples.dtype.name)
    end = members + 2 * _TAR_BLOCK
    data = np.zeros(end + -end % tarfile.RECORDSIZE, np.uint8)
    out = data[:members].reshape(len(samples), -1)
    out[:, :_TAR_BLOCK] = header
    out[:, :10] = names
    out[:, 10 : 10 + len(suffix)] = suffix
    checksums = checksum + names.sum(axis=1, dtype=np.int64) + int(suffix.sum())
    out[:, 148:154] = _digits(checksums, 6, 8)
    out[:, 154] = 0
    out[:, _TAR_BLOCK : _TAR_BLOCK + len(npy)] = npy
    out[:, _TAR_BLOCK + len(npy) : _TAR_BLOCK + size] = payload
    return memoryview(data)


class _HashingReader:
    """A read-only file wrapper that hashes everything read through it."""

    def __init__(self, f: io.BufferedReader):
        self._f = f
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> str:
        """Hash the rest of the file (tar padding) and return the hex sha256 of all of it."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def _damaged(path: str, detail: str) -> DataError:
    return DataError(
        f"shard {path} is truncated or corrupt: {detail}; re-run data_tools/shard.py with the "
        "same arguments (it rebuilds damaged shards) or restore the file"
    )


def _open(store: ShardStore, name: str):
    try:
        return store.open(name)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise DataError(
            f"shard {store.describe(name)} is missing; re-run data_tools/shard.py with the same "
            "arguments to rebuild it"
        ) from exc


def iter_shard(
    store: ShardStore,
    name: str,
    *,
    first_index: int,
    samples: int,
    sample_length: int,
    dtype: str,
    vocab_size: int,
    sha256: Optional[str] = None,
    keep: Optional[Container[int]] = None,
    content: Optional[bytes] = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(sample_index, ids [seq_length + 1])`` for every member of shard ``name`` of
    ``store``, in order, or only for the members whose position in the shard is in ``keep``
    (from ``content`` instead of the store when the file was read already).

    Checks member names and the sample count; decodes and checks array shape, dtype and id
    range of the members it yields; with ``sha256`` also the file's checksum (checked after the
    last sample, before the generator finishes).
    """
    path = store.describe(name)
    expected_dtype = np.dtype(dtype).newbyteorder("<")
    count = 0
    with _open(store, name) if content is None else io.BytesIO(content) as raw:
        reader = _HashingReader(raw)
        try:
            for member in tar_file_iterator(reader):
                index = first_index + count
                if member["fname"] != member_name(index):
                    raise _damaged(
                        path, f"member {member['fname']!r} where {member_name(index)!r} belongs"
                    )
                if keep is not None and count not in keep:
                    count += 1
                    continue
                array = np.lib.format.read_array(io.BytesIO(member["data"]), allow_pickle=False)
                if array.shape != (sample_length,) or array.dtype != expected_dtype:
                    raise _damaged(
                        path,
                        f"{member['fname']} is {array.dtype}{list(array.shape)}, expected "
                        f"{dtype}[{sample_length}]",
                    )
                if int(array.max()) >= vocab_size:
                    raise _damaged(path, f"{member['fname']} holds ids >= vocab size {vocab_size}")
                count += 1
                yield index, array
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise _damaged(path, f"{exc} after {count} of {samples} samples") from exc
        if count != samples:
            raise _damaged(path, f"it holds {count} samples, the manifest says {samples}")
        if sha256 is not None and reader.drain() != sha256:
            raise _damaged(path, "its sha256 differs from the one in manifest.json")


def _canonical_samples(
    data: np.ndarray, first_index: int, samples: int, sample_length: int, dtype: str
) -> Optional[np.ndarray]:
    """The samples [samples, sample_length] of the tar bytes ``data`` if they are exactly what
    :func:`shard_tar` writes for them (every shard.py shard is), else None. Compared in blocks
    of members, so that the check holds at most one block more than the file in memory."""
    member = member_bytes(sample_length, dtype)
    end = samples * member + 2 * _TAR_BLOCK
    if samples == 0 or len(data) != end + -end % tarfile.RECORDSIZE:
        return None
    start = _TAR_BLOCK + len(_npy_header(sample_length, dtype))
    width = sample_length * np.dtype(dtype).itemsize
    members = data[: samples * member].reshape(samples, member)
    tokens = np.ascontiguousarray(members[:, start : start + width])
    tokens = tokens.view(np.dtype(dtype).newbyteorder("<")).reshape(samples, sample_length)
    block = max(1, (4 << 20) // member)
    for a in range(0, samples, block):
        b = min(samples, a + block)
        expected = np.frombuffer(shard_tar(tokens[a:b], first_index + a), np.uint8)
        if not np.array_equal(expected[: (b - a) * member], data[a * member : b * member]):
            return None
    if data[samples * member :].any():
        return None
    return tokens


def read_shard(
    store: ShardStore,
    name: str,
    *,
    first_index: int,
    samples: int,
    sample_length: int,
    dtype: str,
    vocab_size: int,
    sha256: Optional[str] = None,
    rows: np.ndarray,
) -> np.ndarray:
    """The samples at positions ``rows`` [k] of shard ``name`` of ``store``, in that order:
    [k, sample_length], with the checks of :func:`iter_shard`.

    The file is read whole. Laid out exactly as :func:`shard_tar` writes it (re-encoding the
    decoded samples gives the same bytes), it is decoded as one array instead of member by
    member; any other file is read by :func:`iter_shard`'s reader, which names what is wrong.
    """
    path = store.describe(name)
    with _open(store, name) as raw:
        try:
            content = raw.read()
        except OSError as exc:
            raise _damaged(path, str(exc)) from exc
    if sha256 is not None and hashlib.sha256(content).hexdigest() != sha256:
        tokens = None  # the member-by-member reader reports the first damage it meets
    else:
        data = np.frombuffer(content, np.uint8)
        tokens = _canonical_samples(data, first_index, samples, sample_length, dtype)
    if tokens is None:
        position = {int(local): k for k, local in enumerate(rows.tolist())}
        out = np.empty((len(rows), sample_length), np.dtype(dtype).newbyteorder("<"))
        for index, array in iter_shard(
            store,
            name,
            first_index=first_index,
            samples=samples,
            sample_length=sample_length,
            dtype=dtype,
            vocab_size=vocab_size,
            sha256=sha256,
            keep=position,
            content=content,
        ):
            out[position[index - first_index]] = array
        return out
    picked = tokens[rows]
    if len(rows) and int(picked.max()) >= vocab_size:
        bad = int(rows[picked.max(axis=1) >= vocab_size].min())
        raise _damaged(
            path, f"{member_name(first_index + bad)} holds ids >= vocab size {vocab_size}"
        )
    return picked
