"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from slurm_cluster import SlurmCluster, SlurmUnavailable, find_binaries


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real local slurm cluster (two nodes) for the session; skipped without slurm, except in CI."""
    try:
        find_binaries()
    except SlurmUnavailable as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the slurm tests cannot run: {err}")
        pytest.skip(str(err))
    with SlurmCluster.start() as cluster:
        yield cluster
