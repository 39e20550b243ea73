"""compat.lr_schedule: restoring a LambdaLR at step N equals N calls of ``step()``, and the torch
code it relies on is the code it was written against."""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from vqmoe_megatron.compat.lr_schedule import restore_lambda_schedule

PATCHED_CODE = {
    "get_last_lr": "ac64f43933f8f4d6",
    "_update_lr": "d891ef52d8f791ff",
}
"""torch 2.13's ``LRScheduler`` methods the restore relies on -> fingerprint of their code."""


def code_fingerprint(function) -> str:
    """sha256 (16 hex digits) of a function's syntax tree without its docstring."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    if ast.get_docstring(tree) is not None:
        tree.body = tree.body[1:]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def _scheduled(lr: float = 0.1) -> tuple[torch.optim.Optimizer, LambdaLR]:
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": [layer.weight]}, {"params": [layer.bias]}], lr=lr)
    return optimizer, LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4) / (1 + step))


def test_restoring_a_lambda_schedule_equals_stepping_it():
    optimizer, stepped = _scheduled()
    for _ in range(5):
        optimizer.step()
        stepped.step()
    other, restored = _scheduled()
    restore_lambda_schedule(restored, other.param_groups, 5)
    for _ in range(2):
        assert restored.last_epoch == stepped.last_epoch
        assert restored.get_last_lr() == stepped.get_last_lr()
        assert [g["lr"] for g in other.param_groups] == [g["lr"] for g in optimizer.param_groups]
        for opt, scheduler in ((optimizer, stepped), (other, restored)):
            opt.step()
            scheduler.step()


def test_the_torch_code_the_restore_relies_on_is_unchanged():
    found = {name: code_fingerprint(getattr(LRScheduler, name)) for name in PATCHED_CODE}
    assert found == PATCHED_CODE, (
        "torch changed LRScheduler.get_last_lr/_update_lr: check that compat/lr_schedule.py "
        "still puts a LambdaLR at a step (or drop it if torch can now), then update PATCHED_CODE"
    )
