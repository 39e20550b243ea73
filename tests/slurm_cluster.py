"""A real slurm cluster on this one machine, for tests: munged, slurmctld and two slurmd "nodes".

Debian's slurm-wlm is built with MULTIPLE_SLURMD, so ``slurmd -N node1`` and ``slurmd -N node2``
can share a host. Every file lives in a fresh temporary directory (slurm.conf, a munge key, the
munge socket, state, spool, logs); ports are free ones picked at start; nothing under /etc is
read or written, so a system munged or slurm on the machine is left alone. Node names need not
resolve: each node has ``NodeAddr=127.0.0.1`` and ``NodeHostname`` = this host's short name.

    with SlurmCluster.start() as cluster:
        job = cluster.submit("job.sh", env={"X": "1"}, args=["-N", "2"])
        assert cluster.wait(job, timeout=60) == "COMPLETED"

Client commands get ``SLURM_CONF`` through ``cluster.env`` (``os.environ`` is never changed),
and so do the jobs: sbatch exports the submitting environment. Teardown cancels the jobs, stops
the daemons this object started by PID, kills by PID any process left with this cluster's
``SLURM_CONF`` in its environment (job steps outlive a stopped slurmd), and removes the directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
NODES = ("node1", "node2")
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
# sbatch options that fit the scripts' GPU-cluster defaults to these nodes (1 CPU, no GPU).
CPU_NODE_ARGS = ("--gpus-per-node=0", "--cpus-per-task=1")
# Environment variables of an enclosing slurm job that would leak into the test cluster's jobs.
_JOB_ENV = re.compile(
    r"^(SLURM|SBATCH|SRUN|SALLOC)_|^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT)$"
)
"""Variables of an enclosing job or of in-process torch.distributed that jobs must not inherit."""
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class SlurmUnavailable(RuntimeError):
    """The slurm or munge programs needed for a local cluster are not installed."""


def find_binaries() -> dict[str, str]:
    """Absolute paths of the slurm and munge programs; raise SlurmUnavailable if any is missing."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    found = {name: shutil.which(name, path=search) for name in DAEMONS + CLIENTS}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        raise SlurmUnavailable(
            f"not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm munge, "
            "or bash .ci/install_system_deps.sh)"
        )
    return {name: str(path) for name, path in found.items()}


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``check`` until it returns something other than None; TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def program_env(repo: Path, **knobs: str) -> dict[str, str]:
    """Environment for an sbatch script that runs ``repo``'s real training program: this
    interpreter, ``repo`` importable first (whatever an editable install points at), gloo over
    the loopback device (every node of the local cluster is this host), plus the script's knobs.
    """
    return {
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
        "GLOO_SOCKET_IFNAME": "lo",
        **knobs,
    }


def read_marker(marker: Path) -> str | None:
    """A marker file's text (``preempted``: "step N signal S") once written in full, else None."""
    try:
        text = marker.read_text()
    except FileNotFoundError:
        return None
    return text if text.endswith("\n") else None


def _free_ports(count: int) -> list[int]:
    """Ports that are free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file, or a note that it does not exist."""
    if not path.exists():
        return f"--- {path.name}: (missing)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join([f"--- {path.name} (last {len(text)} lines)", *text])


def parse_record(line: str) -> dict[str, str]:
    """Fields of one ``scontrol -o show ...`` line; values may contain spaces (Command=...)."""
    fields: dict[str, str] = {}
    key = None
    for token in line.split():
        name, sep, value = token.partition("=")
        if sep and re.fullmatch(r"[A-Za-z][\w:/]*", name):
            key = name
            fields[key] = value
        elif key is not None:
            fields[key] += " " + token
    return fields


class SlurmCluster:
    """A running local cluster; build it with ``SlurmCluster.start()`` (a context manager)."""

    def __init__(self, root: Path, binaries: Mapping[str, str]) -> None:
        self.root = root
        self.bin = dict(binaries)
        self.conf = root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not _JOB_ENV.match(k)}
        self.env["SLURM_CONF"] = str(self.conf)
        self._daemons: list[tuple[str, subprocess.Popen[bytes]]] = []

    @classmethod
    def start(cls, timeout: float = 90.0) -> SlurmCluster:
        """Write the configuration, start the daemons, wait until both nodes are idle."""
        binaries = find_binaries()
        root = Path(tempfile.mkdtemp(prefix="slurm-test-"))
        cluster = cls(root, binaries)
        try:
            cluster._configure()
            cluster._start_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- set-up -------------------------------------------------------------------------------

    def _configure(self) -> None:
        """Write the munge key and slurm.conf."""
        # munged wants every directory above its socket searchable by all, its key private.
        self.root.chmod(0o755)
        key_dir = self.root / "munge"
        key_dir.mkdir(mode=0o700)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()

        user = pwd.getpwuid(os.getuid()).pw_name
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        r = self.root
        nodes = [
            f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs=1"
            for name, port in zip(NODES, node_ports)
        ]
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=localtest",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmUser={user}",
                    f"SlurmdUser={user}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire: a requeued job may start again only cred_expire + 1 s after
                    # the requeue (default 120 s).
                    f"AuthInfo=socket={r}/munge.socket,cred_expire=10",
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool/%n",
                    f"SlurmctldPidFile={r}/slurmctld.pid",
                    f"SlurmdPidFile={r}/slurmd.%n.pid",
                    f"SlurmctldLogFile={r}/slurmctld.log",
                    f"SlurmdLogFile={r}/slurmd.%n.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "MpiDefault=none",
                    "SchedulerType=sched/builtin",
                    # Look at pending jobs every 2 s (default 60 s), e.g. a requeued one.
                    "SchedulerParameters=sched_interval=2",
                    "ReturnToService=2",
                    "KillWait=10",
                    "MinJobAge=600",
                    *nodes,
                    f"PartitionName=debug Nodes={','.join(NODES)} Default=YES "
                    "MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _spawn(self, name: str, args: Sequence[str], binary: str) -> None:
        """Start one daemon in the foreground, as a child of this process."""
        with open(self.root / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(
                [self.bin[binary], *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._daemons.append((name, proc))

    def _start_daemons(self, timeout: float) -> None:
        """Start munged, slurmctld and the slurmds; wait until sinfo shows every node idle."""
        r = self.root
        self._spawn(
            "munged",
            [
                "--foreground",
                f"--key-file={r}/munge/munge.key",
                f"--socket={r}/munge.socket",
                f"--pid-file={r}/munged.pid",
                f"--seed-file={r}/munged.seed",
                f"--log-file={r}/munged.log",
            ],
            "munged",
        )
        self._wait_alive(lambda: (r / "munge.socket").exists() or None, timeout, "munge's socket")
        self._spawn("slurmctld", ["-D", "-f", str(self.conf)], "slurmctld")
        self._wait_alive(
            lambda: self._query("sinfo", "-h") is not None or None, timeout, "slurmctld to answer"
        )
        for node in NODES:
            self._spawn(f"slurmd.{node}", ["-D", "-N", node, "-f", str(self.conf)], "slurmd")
        self._wait_alive(self._all_idle, timeout, "both nodes idle in sinfo")

    def _wait_alive(self, check: Callable[[], object], timeout: float, what: str) -> None:
        """wait_for(check), failing early if a daemon exits; errors carry the daemons' logs."""

        def alive_check() -> object:
            for name, proc in self._daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {proc.returncode}")
            return check()

        try:
            wait_for(alive_check, timeout, what)
        except (RuntimeError, TimeoutError) as err:
            raise RuntimeError(f"local slurm cluster did not start: {err}\n{self.logs()}") from err

    def _all_idle(self) -> bool | None:
        """True when sinfo lists every node as idle."""
        out = self._query("sinfo", "-h", "-N", "-o", "%N %t")
        states = dict(line.split() for line in (out or "").splitlines() if line.strip())
        return True if all(states.get(node) == "idle" for node in NODES) else None

    # --- commands ---------------------------------------------------------------------------

    def _query(self, binary: str, *args: str) -> str | None:
        """Output of a client command, or None if it fails (e.g. the controller is not up)."""
        proc = subprocess.run(
            [self.bin[binary], *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        return proc.stdout if proc.returncode == 0 else None

    def run(self, binary: str, *args: str, env: Mapping[str, str] | None = None) -> str:
        """Run a client command (sbatch, scontrol, ...) against this cluster; return stdout."""
        proc = subprocess.run(
            [self.bin[binary], *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{binary} {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc.stdout

    def submit(
        self,
        script: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        args: Iterable[str] = (),
        script_args: Iterable[str] = (),
    ) -> str:
        """sbatch ``script`` with sbatch options ``args`` and extra environment; return the job id."""
        out = self.run("sbatch", "--parsable", *args, str(script), *script_args, env=env)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record from ``scontrol show job`` (JobState, Restarts, NodeList, ...)."""
        return parse_record(self.run("scontrol", "-o", "show", "job", job_id))

    def state(self, job_id: str) -> str:
        """The job's state without flags, e.g. RUNNING, PENDING, COMPLETED."""
        return self.job(job_id)["JobState"]

    def wait(self, job_id: str, timeout: float = 120.0) -> str:
        """Wait until the job reaches a final state (COMPLETED, FAILED, ...) and return it.

        A requeued job passes through PENDING again and is waited for until its last run ends.
        """

        def final_state() -> str | None:
            state = self.state(job_id)
            return state if state in FINAL_STATES else None

        try:
            return wait_for(final_state, timeout, f"job {job_id} to end")
        except TimeoutError as err:
            raise TimeoutError(f"{err}; job record: {self.job(job_id)}\n{self.logs()}") from err

    def requeue(self, job_id: str) -> None:
        """``scontrol requeue``: end the running job and put it back in the queue."""
        self.run("scontrol", "requeue", job_id)

    def while_running(self, job_id: str, check: Callable[[], T | None], timeout: float = 300) -> T:
        """``wait_for(check)``, failing at once if the job ends first."""

        def running_check() -> T | None:
            if self.state(job_id) in FINAL_STATES:
                raise AssertionError(f"job {job_id} ended early: {self.job(job_id)}")
            return check()

        return wait_for(running_check, timeout=timeout, what=f"job {job_id}")

    def signal(self, job_id: str, sig: str | int, batch: bool = False) -> None:
        """``scancel --signal``: send ``sig`` to every job step's processes (or the batch shell)."""
        name = signal.Signals(sig).name if isinstance(sig, int) else sig
        options = [f"--signal={name.removeprefix('SIG')}"] + (["--batch"] if batch else [])
        self.run("scancel", *options, job_id)

    def logs(self) -> str:
        """Tails of every daemon's log and console output, for error messages."""
        names = ["munged.log", "slurmctld.log", *(f"slurmd.{n}.log" for n in NODES)]
        names += [f"{name}.out" for name, _ in self._daemons]
        return "\n".join(_tail(self.root / name) for name in names)

    # --- teardown ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons started here, kill leftovers, remove the directory."""
        try:
            if any(proc.poll() is None for name, proc in self._daemons if name == "slurmctld"):
                self._cancel_jobs()
            for _name, proc in reversed(self._daemons):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            self._kill_leftovers()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _cancel_jobs(self) -> None:
        """scancel every job of this cluster and wait (bounded) until the queue is empty."""
        jobs = (self._query("squeue", "-h", "-o", "%i") or "").split()
        if not jobs:
            return
        self._query("scancel", *jobs)
        # If that times out, _kill_leftovers takes what is still running.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: self._query("squeue", "-h") == "" or None, 60, "the queue to empty")

    def _kill_leftovers(self) -> None:
        """SIGKILL every process that carries this cluster's SLURM_CONF (job steps, tasks)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                if marker in environ:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
