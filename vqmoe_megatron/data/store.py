"""Where a shard directory lives: a local path, an ``http(s)://`` prefix, or a ``pipe:`` command.

``data.data_dir`` (and every ``data.sources[].path``) names one of:

- a local directory: files are streamed from disk, as before;
- ``http://host/prefix`` or ``https://...``: file ``NAME`` is ``GET prefix/NAME``;
- ``pipe:COMMAND`` (WebDataset's convention): file ``NAME`` is what ``COMMAND`` writes to stdout,
  with ``{name}`` in it replaced by the shell-quoted file name, for example
  ``pipe:aws s3 cp s3://bucket/shards/{name} -`` or ``pipe:curl -sfL https://host/shards/{name}``.

A remote file (manifest or shard) is read whole into memory, so that a failed transfer can be
retried from the start: ``attempts`` tries in all, sleeping ``backoff_s``, then twice that, and
so on between them; after the last, one DataError names the file and the last failure. The
loader checks a shard's sha256 on the bytes it received when ``data.verify_checksums`` is set.
"""

from __future__ import annotations

import http.client
import io
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vqmoe_megatron.data.errors import DataError

PIPE = "pipe:"
NAME_FIELD = "{name}"


@dataclass(frozen=True)
class FetchPolicy:
    """How often and how patiently remote files are fetched (see the module docstring)."""

    attempts: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise DataError(
                "fetch settings out of range: need data.fetch_attempts >= 1, "
                f"data.fetch_backoff_s >= 0 and data.fetch_timeout_s > 0 (got {self.attempts}, "
                f"{self.backoff_s}, {self.timeout_s})"
            )


def is_remote(location: str) -> bool:
    """Whether ``location`` is an http(s) prefix or a pipe: template rather than a local path."""
    return location.startswith(("http://", "https://", PIPE))


class ShardStore(ABC):
    """Read access to the files of one shard directory, wherever it is."""

    location: str

    @abstractmethod
    def describe(self, name: str) -> str:
        """The path, URL or command of file ``name`` (for messages)."""

    @abstractmethod
    def open(self, name: str) -> BinaryIO:
        """A binary file object of ``name``; FileNotFoundError if a local file is missing,
        DataError if a remote one cannot be fetched."""


class LocalStore(ShardStore):
    """A directory on a local (or network-mounted) file system."""

    def __init__(self, location: str):
        self.location = location
        self.root = Path(location)

    def describe(self, name: str) -> str:
        return str(self.root / name)

    def open(self, name: str) -> BinaryIO:
        return open(self.root / name, "rb")


class RemoteStore(ShardStore):
    """An http(s) prefix or a ``pipe:`` command template, read whole with retries."""

    def __init__(self, location: str, policy: FetchPolicy):
        if location.startswith(PIPE) and NAME_FIELD not in location:
            raise DataError(
                f"data location '{location}' has no {NAME_FIELD}: a pipe: command must name the "
                f"file it fetches, e.g. 'pipe:curl -sfL https://host/shards/{NAME_FIELD}'"
            )
        self.location = location
        self.policy = policy

    def describe(self, name: str) -> str:
        if self.location.startswith(PIPE):
            return self._command(name)
        return f"{self.location.rstrip('/')}/{name}"

    def _command(self, name: str) -> str:
        return self.location[len(PIPE) :].replace(NAME_FIELD, shlex.quote(name))

    def _fetch_once(self, name: str) -> bytes:
        timeout = self.policy.timeout_s
        if self.location.startswith(PIPE):
            done = subprocess.run(
                self._command(name), shell=True, capture_output=True, timeout=timeout
            )
            if done.returncode != 0:
                tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
                raise OSError(f"command exited with status {done.returncode}: {tail[0]}")
            return done.stdout
        with urllib.request.urlopen(self.describe(name), timeout=timeout) as response:
            return response.read()

    def open(self, name: str) -> BinaryIO:
        delay = self.policy.backoff_s
        for attempt in range(1, self.policy.attempts + 1):
            try:
                return io.BytesIO(self._fetch_once(name))
            except (
                OSError,
                urllib.error.URLError,
                http.client.HTTPException,
                subprocess.TimeoutExpired,
            ) as exc:
                last = exc
            if attempt < self.policy.attempts:
                time.sleep(delay)
                delay *= 2
        raise DataError(
            f"cannot fetch {self.describe(name)}: {type(last).__name__}: {last} (after "
            f"{self.policy.attempts} attempts); check that the server or command can serve it, "
            "or raise data.fetch_attempts / data.fetch_timeout_s"
        )


def open_store(location: str | Path, policy: FetchPolicy | None = None) -> ShardStore:
    """The store of ``location``: remote for http(s):// and pipe:, else a local directory."""
    location = str(location)
    if is_remote(location):
        return RemoteStore(location, policy or FetchPolicy())
    return LocalStore(location)
