"""The trainer's stop request: a signal any rank received stops every rank, and all of them
know which signal it was (rank 0 writes it into the ``preempted`` marker)."""

import signal

import pytest
from dist_utils import torchrun

pytestmark = pytest.mark.distributed


def test_every_rank_agrees_on_the_signal_one_rank_received():
    output = torchrun("stop_request.py", 2)
    usr1 = int(signal.SIGUSR1)
    assert f"rank 0: received None, agreed None then {usr1}" in output, output
    assert f"rank 1: received {usr1}, agreed None then {usr1}" in output, output
