"""Shards read from URLs: an http.server on 127.0.0.1 serving a shard directory (with flaky,
failing, truncating and corrupting paths), and ``pipe:`` command templates."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from data_helpers import tiny_shards

from vqmoe_megatron.data import DataError, TokenShardLoader, load_manifest
from vqmoe_megatron.data.store import FetchPolicy

FAST = FetchPolicy(attempts=3, backoff_s=0.01, timeout_s=10)


class ShardServer(ThreadingHTTPServer):
    """Serves ``root``; per file name, how many first requests fail (``flaky``), whether every
    request fails (``broken``), is cut short (``truncated``) or has one bit flipped
    (``corrupt``); ``requests`` counts the GETs per file name."""

    daemon_threads = True

    def __init__(self, root: Path):
        self.root = root
        self.flaky: dict[str, int] = {}
        self.broken: set[str] = set()
        self.truncated: set[str] = set()
        self.corrupt: set[str] = set()
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/shards"


class _Handler(SimpleHTTPRequestHandler):
    server: ShardServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        server = self.server
        with server.lock:
            server.requests[name] += 1
            failing = name in server.broken or server.requests[name] <= server.flaky.get(name, 0)
        path = server.root / name
        if failing or not self.path.startswith("/shards/") or not path.is_file():
            self.send_error(503 if failing else 404)
            return
        data = bytearray(path.read_bytes())
        if name in server.corrupt:
            data[512 + 128 + 20] ^= 1  # a token id of the first sample; stays < vocab
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if name in server.truncated else data)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shards(tmp_path_factory, "main")


@pytest.fixture
def server(shards: Path) -> Iterator[ShardServer]:
    server = ShardServer(shards)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _batches(data, count: int, **kwargs) -> list[list[int]]:
    settings = {"micro_batch_size": 4, "dp_rank": 1, "dp_size": 2, "num_workers": 2, "seed": 3}
    stream = iter(TokenShardLoader(data, "train", **{**settings, **kwargs}))
    try:
        return [next(stream)["tokens"].tolist() for _ in range(count)]
    finally:
        stream.close()


def _read_all(data, **kwargs) -> int:
    """Samples in one ordered pass over the train split."""
    one_pass = {"dp_rank": 0, "dp_size": 1, "num_workers": 0, "shuffle": False, "infinite": False}
    loader = TokenShardLoader(data, "train", micro_batch_size=64, seed=0, **one_pass, **kwargs)
    return sum(len(b["index"]) for b in loader)


def test_http_and_pipe_shards_give_the_local_batches(shards: Path, server: ShardServer):
    local = _batches(shards, 30)
    remote = load_manifest(server.url, FAST)
    assert remote.raw == load_manifest(shards).raw
    assert remote.path == f"{server.url}/manifest.json"
    assert _batches(server.url, 30, fetch=FAST, verify_checksums=True) == local
    assert server.requests["manifest.json"] == 2  # load_manifest above, then the loader
    assert _batches(f"pipe:cat {shards}/{{name}}", 30, verify_checksums=True) == local


def test_flaky_downloads_are_retried_then_succeed(shards: Path, server: ShardServer):
    names = [s.name for s in load_manifest(shards).split("train").shards]
    server.flaky = {"manifest.json": 2, **{name: 2 for name in names}}  # 2 failures, 3rd works
    assert _read_all(server.url, fetch=FAST) == load_manifest(shards).split("train").samples
    assert all(server.requests[name] == 3 for name in ["manifest.json", *names])


@pytest.mark.parametrize("fault", ["broken", "truncated"])
def test_a_failing_shard_is_named_after_bounded_retries(
    fault: str, shards: Path, server: ShardServer
):
    getattr(server, fault).add("train-000004.tar")
    with pytest.raises(DataError) as err:
        _read_all(server.url, fetch=FAST)
    message = str(err.value)
    assert message.startswith(f"cannot fetch {server.url}/train-000004.tar: ")
    assert "(after 3 attempts)" in message and "data.fetch_attempts" in message
    assert ("503" if fault == "broken" else "IncompleteRead") in message
    assert server.requests["train-000004.tar"] == 3


def test_checksums_are_verified_on_the_received_bytes(shards: Path, server: ShardServer):
    server.corrupt.add("train-000002.tar")
    assert _read_all(server.url, fetch=FAST) == load_manifest(shards).split("train").samples
    with pytest.raises(DataError, match=r"shard http://.*/train-000002\.tar .*sha256 differs"):
        _read_all(server.url, fetch=FAST, verify_checksums=True)


def test_missing_manifest_and_bad_locations(shards: Path, server: ShardServer, tmp_path: Path):
    with pytest.raises(DataError, match=r"cannot fetch http://127\.0\.0\.1:\d+/nothing/manifest"):
        load_manifest(server.url.replace("shards", "nothing"), FAST)
    with pytest.raises(DataError, match=r"cannot fetch cat .*/manifest\.json: OSError: command "):
        load_manifest(f"pipe:cat {tmp_path}/{{name}}", FAST)
    with pytest.raises(DataError, match=r"has no \{name\}"):
        load_manifest(f"pipe:cat {shards}/manifest.json")
    with pytest.raises(DataError, match="data.fetch_attempts >= 1"):
        FetchPolicy(attempts=0)
