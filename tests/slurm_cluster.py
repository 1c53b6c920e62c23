"""A real single-node SLURM cluster for the tests, started as root without systemd.

Debian's slurm-wlm (22.05) and munge: munged, slurmctld and slurmd run in the foreground under
this process, with every file (config, state, spool, sockets, logs) in one temporary directory,
and are stopped by their PIDs. The node declares two GPUs backed by character devices made with
mknod (major 195, as NVIDIA's), so GPU jobs are scheduled on a GPU-less machine; a count-only
GPU line would drain the node. No accounting database: jobs are polled with squeue, and
MinJobAge keeps finished jobs visible to ``scontrol show job`` for the assertions.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NVIDIA_MAJOR = 195
# snakemake-executor-plugin-slurm-jobstep drops SLURM_CONF before its inner `srun`, which then
# only finds the compiled-in default path: the test cluster's config is linked there while it runs.
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
CLUSTER_NAME = "refusal-atlas-test"
CTLD = "slurmctld"


def missing_requirements() -> str | None:
    """Why no cluster can be started here, or None when one can."""
    if os.geteuid() != 0:
        return "a SLURM cluster needs root"
    missing = [b for b in (*DAEMONS, "sbatch", "squeue", "scontrol") if shutil.which(b) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm slurm-client munge)"
    if _stale_test_link():
        # A test run killed before its teardown (SIGKILL, a machine restart) leaves the link
        # behind; it is ours and dead, so it must not block every later run on this machine.
        DEFAULT_CONF.unlink()
    if DEFAULT_CONF.exists() or DEFAULT_CONF.is_symlink():
        return f"{DEFAULT_CONF} exists: this machine has a SLURM configuration of its own, left untouched"
    return None


def _slurmctld_alive(pid_file: Path) -> bool:
    """Whether the pid in ``pid_file`` is a running slurmctld (a restart may reuse the pid)."""
    try:
        comm = Path(f"/proc/{int(pid_file.read_text().strip())}/comm").read_text().strip()
    except (OSError, ValueError):
        return False
    return comm == CTLD


def _stale_test_link() -> bool:
    """Whether DEFAULT_CONF is a link a killed test left: to nothing, or to a test cluster's
    config whose slurmctld is gone. Anything else (a real file, a live cluster) is not ours."""
    if not DEFAULT_CONF.is_symlink():
        return False
    target = DEFAULT_CONF.resolve()
    if not target.exists():
        return True
    try:
        text = target.read_text()
    except OSError:
        return False
    if f"ClusterName={CLUSTER_NAME}\n" not in text:
        return False
    return not _slurmctld_alive(target.parent / "slurmctld.pid")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    cpus: int
    mem_mb: int
    gpus: int
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def partition(self) -> str:
        return "main"

    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, check=True, capture_output=True, text=True).stdout

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (finished ones for MinJobAge), as key=value dicts."""
        out = self.run("scontrol", "show", "job", "--oneliner")
        jobs = []
        for line in out.splitlines():
            if not line.strip() or line.startswith("No jobs"):
                continue
            fields = {}
            for token in line.split():
                key, _, value = token.partition("=")
                fields[key] = value
            jobs.append(fields)
        return jobs

    def log(self, daemon: str) -> str:
        path = self.root / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _write_config(c: Cluster, port_ctld: int, port_d: int) -> Path:
    gres = c.root / "gres.conf"
    devices = []
    for i in range(c.gpus):
        dev = c.root / f"nvidia{i}"
        os.mknod(dev, 0o666 | 0o020000, os.makedev(NVIDIA_MAJOR, i))  # S_IFCHR
        devices.append(str(dev))
    gres.write_text("".join(f"Name=gpu File={d}\n" for d in devices))
    conf = c.root / "slurm.conf"
    conf.write_text(
        f"""ClusterName={CLUSTER_NAME}
SlurmctldHost=localhost
SlurmctldPort={port_ctld}
SlurmdPort={port_d}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={c.root}/munge.socket
CredType=cred/munge
StateSaveLocation={c.root}/state
SlurmdSpoolDir={c.root}/spool
SlurmctldPidFile={c.root}/slurmctld.pid
SlurmdPidFile={c.root}/slurmd.pid
SlurmctldLogFile={c.root}/slurmctld.log
SlurmdLogFile={c.root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
GresTypes=gpu
DefMemPerCPU=1000
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs={c.cpus} RealMemory={c.mem_mb} Gres=gpu:{c.gpus} State=UNKNOWN
PartitionName={c.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def _wait(predicate, what: str, c: Cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in c.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n{c.log(name)[-3000:]}")
        try:
            if predicate():
                return
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"SLURM: {what} did not happen in {timeout:.0f} s\n{c.log('slurmctld')[-3000:]}")


def stop(c: Cluster) -> None:
    """Stop the daemons by their PIDs, slurmd first."""
    for name in reversed(DAEMONS):
        p = c.procs.get(name)
        if p is None or p.poll() is not None:
            continue
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextmanager
def slurm_cluster(root: Path, *, cpus: int = 4, mem_mb: int = 16000, gpus: int = 2) -> Iterator[Cluster]:
    """Start munged, slurmctld and slurmd under ``root``; yield the cluster; stop them.

    The node may declare more CPUs than the machine has (``config_overrides``): two 2-thread jobs
    then run side by side, which hides the scheduler's polling latency behind each other's work.
    """
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    c = Cluster(root=root, cpus=cpus, mem_mb=mem_mb, gpus=gpus)
    conf = _write_config(c, _free_port(), _free_port())
    # The node declares more CPUs than the machine has, so two 2-thread jobs share its cores; torch's
    # OpenMP threads then spin-wait on each other and slow both many times over (docs/architecture.md,
    # "Run time"). Jobs inherit this environment through sbatch.
    c.env = {**os.environ, "SLURM_CONF": str(conf), "OMP_WAIT_POLICY": "PASSIVE"}
    DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
    DEFAULT_CONF.symlink_to(conf)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    out = open(root / "daemons.out", "ab")
    try:
        c.procs["munged"] = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
             f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"],
            stdout=out, stderr=out,
        )
        _wait(lambda: (root / "munge.socket").exists(), "munged's socket", c)
        c.procs["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], stdout=out, stderr=out,
                                                env=c.env)
        _wait(lambda: "UP" in c.run("scontrol", "ping"), "slurmctld answering ping", c)
        c.procs["slurmd"] = subprocess.Popen(["slurmd", "-D", "-N", "localhost", "-f", str(conf)], stdout=out,
                                             stderr=out, env=c.env)
        _wait(lambda: c.run("sinfo", "-h", "-N", "-o", "%T").strip() in ("idle", "mixed", "allocated"),
              "the node becoming idle", c)
        yield c
    finally:
        stop(c)
        out.close()
        if DEFAULT_CONF.is_symlink() and DEFAULT_CONF.resolve() == conf.resolve():
            DEFAULT_CONF.unlink()
