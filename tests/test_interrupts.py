"""Ctrl-C at any moment of any command: exit status 130 and one line, never a traceback.

The signal goes to the command's whole process group, as a terminal's Ctrl-C does (worker
processes get it too). Moments: during the imports (seconds: torch, megatron, DeepSpeed) and
in the middle of the work; an interrupted shard.py run then resumes to the same result, and an
interrupted training run saves its step first, so that the rerun resumes from it.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from data_helpers import FIXTURE, tiny_shards, tiny_tokenizer
from dist_utils import child_env
from pretrain_helpers import CONFIG, SCRIPT, overrides

from vqmoe_megatron.checkpoint.training import find_latest

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def interpreter_startup_cpu_s() -> float:
    """CPU seconds a bare ``python -c pass`` of this environment takes (site module included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=child_env())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _wait_inside_the_imports(proc: subprocess.Popen) -> None:
    """Wait until ``proc`` has used 4x the CPU time of the interpreter's own startup: past it
    (a Ctrl-C there ends Python before any of our code runs) and so past the guard, which every
    command installs first, yet well inside the imports (torch alone takes far longer). CPU
    time, not wall time: on a loaded machine the startup alone can take seconds."""
    threshold = 4 * interpreter_startup_cpu_s()
    process = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while sum(process.cpu_times()[:2]) < threshold:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never got past interpreter startup"
        time.sleep(0.01)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _ctrl_c(proc: subprocess.Popen) -> tuple[str, str]:
    """Ctrl-C to the process group; the command's (stdout, stderr) once it has exited."""
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return out, err


def _assert_interrupted(proc: subprocess.Popen, out: str, err: str) -> None:
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err[-3000:]
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("interrupted"), err[-3000:]
    assert sum(line.startswith("interrupted") for line in err.splitlines()) == 1, err


COMMANDS = {
    "fetch_corpus": ["data_tools/fetch_corpus.py", "sotu", "--output", "{tmp}/corpora"],
    "train_tokenizer": ["data_tools/train_tokenizer.py", str(FIXTURE), "--output-prefix", "{tmp}/t"],
    "shard": ["data_tools/shard.py", str(FIXTURE), "--tokenizer", "{tmp}/t.model", "--output", "{tmp}/s", "--seq-length", "8"],
    "inspect": ["data_tools/inspect.py", "{tmp}/s"],
    "make_sst2": ["data_tools/make_sst2.py", "{tmp}/x.whl", "--out", "{tmp}/sst2"],
    "pretrain": [str(SCRIPT), "--config", str(CONFIG), "data.data_dir={tmp}/s"],
    "finetune": ["finetune/glue.py", "--task", "sst2", "--data_dir", "{tmp}", "--pretrained", "{tmp}/run"],
    "convert": ["-m", "vqmoe_megatron.convert", "consolidated", "{tmp}/run", "{tmp}/c"],
    "evaluate": ["-m", "vqmoe_megatron.evaluate", "--checkpoint", "{tmp}/run", "--data-dir", "{tmp}/s"],
    "vqmoe-convert": ["-c", "from vqmoe_megatron.commands import convert; convert()"],
    "vqmoe-evaluate": ["-c", "from vqmoe_megatron.commands import evaluate; evaluate()"],
}  # fmt: skip


@pytest.mark.parametrize("name", list(COMMANDS))
def test_ctrl_c_during_startup(name: str, tmp_path: Path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in COMMANDS[name]]
    proc = _start(args, REPO)
    _wait_inside_the_imports(proc)
    _assert_interrupted(proc, *_ctrl_c(proc))


def _wait_for(proc: subprocess.Popen, stream, marker: str, timeout: float = 300) -> str:
    """Read ``stream`` of ``proc`` until ``marker`` appears; returns what was read."""
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        char = stream.read(1)
        assert char and time.monotonic() < deadline, (proc.poll(), seen[-3000:])
        seen += char
    return seen


@pytest.mark.slow  # three shard.py runs over ~6 MB of text (~30 s on a busy 2-core box)
def test_ctrl_c_mid_sharding_then_the_rerun_resumes(tmp_path: Path, tmp_path_factory):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for copy in range(20):  # enough text for several seconds of tokenizing
        for path in FIXTURE.glob("*.txt"):
            shutil.copy(path, inputs / f"{copy}_{path.name}")
    tokenizer = str(tiny_tokenizer(tmp_path_factory))

    def args(out: str) -> list[str]:
        return ["data_tools/shard.py", str(inputs), "--tokenizer", tokenizer, "--output", out,
                "--seq-length", "64", "--workers", "2", "--shard-size-mb", "0.05"]  # fmt: skip

    proc = _start(args(str(tmp_path / "out")), REPO)
    seen = _wait_for(proc, proc.stderr, "sharding:")
    out, err = _ctrl_c(proc)
    _assert_interrupted(proc, out, seen + err)
    for name in ("out", "reference"):  # the interrupted run resumes; a fresh one to compare
        done = subprocess.run(
            [sys.executable, *args(str(tmp_path / name)), "--quiet"],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    shards = sorted((tmp_path / "reference").glob("*.tar"))
    assert len(shards) > 2
    for shard in shards:
        assert (tmp_path / "out" / shard.name).read_bytes() == shard.read_bytes()


@pytest.mark.slow  # a tiny pretraining run's start-up, twice (~60 s on a busy 2-core box)
def test_ctrl_c_mid_training_saves_and_the_rerun_resumes(tmp_path: Path, tmp_path_factory):
    """The first Ctrl-C finishes the step, saves it, and exits 130 naming the checkpoint."""
    shards = tiny_shards(tmp_path_factory, "interrupts")
    out = tmp_path / "run"
    proc = _start(
        [str(SCRIPT), "--config", str(CONFIG), *overrides(shards, out, "train.steps=100000")], REPO
    )
    seen = _wait_for(proc, proc.stdout, "step 2/")
    stdout, err = _ctrl_c(proc)
    _assert_interrupted(proc, seen + stdout, err)
    last = err.strip().splitlines()[-1]
    step = int(last.split("at step ")[1].split(":")[0])
    checkpoint = out / "checkpoints" / f"step_{step:08d}"
    assert step >= 2 and f"saved checkpoint {checkpoint}; run the same command" in last, last
    assert find_latest(out / "checkpoints") == checkpoint
    assert not (out / "complete").exists() and not (out / "preempted").exists()
    rerun = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(CONFIG),
         *overrides(shards, out, f"train.steps={step + 1}")],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {step}" in rerun.stdout
    assert (out / "complete").read_text() == f"{step + 1}\n"


def test_a_second_ctrl_c_aborts_at_once_but_a_forwarded_copy_does_not():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "workers" / "ctrl_c.py")],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == f"after two at once: {int(signal.SIGINT)}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "interrupted again: stopped without saving"
