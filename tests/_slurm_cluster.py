"""A real one-node SLURM cluster for tests: munged + slurmctld + slurmd started from a temporary directory.

Nothing here touches the system configuration: slurm.conf, the munge key, sockets, spool and state
directories, pid and log files all live under one temporary directory, and the daemons listen on free
ports. Clients (sbatch, squeue, scontrol, scancel) find the cluster through the SLURM_CONF variable in
:attr:`SlurmCluster.env`. The daemons run in the foreground as children of the test process and are
stopped by :meth:`SlurmCluster.stop` (SIGTERM, then SIGKILL), never by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ports  # noqa: E402

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def missing_binaries() -> list[str]:
    """Names of the SLURM / munge programs that are not installed (searched in PATH and /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [b for b in SLURM_BINARIES if shutil.which(b, path=path) is None]


def _which(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (Debian: apt-get install slurmctld slurmd munge)")
    return found


# Ports below the kernel's ephemeral range, never handed out twice in this process (see _ports.py);
# test_slurm.py and test_ray_job_submit.py import free_port_block from here.
free_port = _ports.free_port
free_port_block = _ports.free_port_block


@dataclass
class SlurmCluster:
    """Handle on a running one-node cluster; use :func:`start_slurm_cluster` to create one."""

    root: Path
    conf: Path
    node_name: str
    cpus: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client (sbatch, squeue, ...) against this cluster."""
        return subprocess.run(
            [_which(args[0]), *args[1:]],
            env=kw.pop("env", self.env),
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
            **kw,
        )

    def sbatch(self, script: str | Path, *options: str, cwd: str | Path | None = None) -> int:
        """Submit ``script`` with ``options``; returns the job id."""
        out = self.run("sbatch", "--parsable", *options, str(script), cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a final state; returns its info. TimeoutError names the last state."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            self._check_daemons()
            time.sleep(2)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")

    def node_state(self) -> str:
        out = self.run("scontrol", "show", "node", "--oneliner", self.node_name, check=False).stdout
        m = re.search(r"State=(\S+)", out)
        return m.group(1) if m else "?"

    def logs(self) -> str:
        """The daemons' log files, for failure messages."""
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            p = self.root / name
            if p.exists():
                parts.append(f"==== {name} ====\n" + p.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def _check_daemons(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}\n{self.logs()}")

    def job_ids(self) -> list[int]:
        out = self.run("squeue", "--noheader", "--format=%i", check=False).stdout
        return [int(x) for x in out.split()]

    def cancel_all(self, timeout: float = 40.0) -> None:
        """scancel every job of this cluster and wait until none is left (Slurm's KillWait is 10 s here)."""
        ids = self.job_ids()
        if not ids:
            return
        self.run("scancel", *map(str, ids), check=False)
        deadline = time.monotonic() + timeout
        while self.job_ids() and time.monotonic() < deadline:
            time.sleep(1)

    def _stray_pids(self) -> list[int]:
        """Processes (job scripts, slurmstepd, Ray started by a job) whose environment names this cluster's
        SLURM_CONF: everything slurmd launched carries it, nothing else on the machine does."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if marker in env.split(b"\0"):
                pids.append(int(d.name))
        return pids

    def _kill_strays(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._stray_pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            if pids and sig == signal.SIGTERM:
                time.sleep(3)

    def stop(self) -> None:
        """Cancel the jobs, stop slurmd, slurmctld and munged (the processes this object started), kill what
        the jobs may have left, then remove the files."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._kill_strays()
        shutil.rmtree(self.root, ignore_errors=True)


def _slurm_conf(root: Path, *, node: str, cpus: int, ctld_port: int, slurmd_port: int, user: str) -> str:
    return f"""\
# Written by tests/_slurm_cluster.py: a one-node test cluster, everything under {root}
ClusterName=deeplense-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmdTimeout=120
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def start_slurm_cluster(*, timeout: float = 60.0, attempts: int = 3) -> SlurmCluster:
    """Write a config under a new temporary directory, start munged, slurmctld and slurmd, wait until the
    node is idle. Raises RuntimeError (with the daemons' logs) if it does not come up within ``timeout`` s.
    A daemon that could not bind its port (taken by another process since it was checked free) is
    started again with fresh ports, up to ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_slurm_cluster_once(timeout=timeout)
        except RuntimeError as exc:
            if attempt == attempts or not _ports.address_in_use(str(exc)):
                raise
    raise AssertionError("unreachable")


def _start_slurm_cluster_once(*, timeout: float) -> SlurmCluster:
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    os.chmod(root, 0o700)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(mode=0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    (root / "plugstack.conf").write_text("")
    conf = root / "slurm.conf"
    conf.write_text(
        _slurm_conf(
            root, node=node, cpus=cpus, ctld_port=free_port(), slurmd_port=free_port(), user=user
        )
    )
    cluster = SlurmCluster(root=root, conf=conf, node_name=node, cpus=cpus)
    devnull = subprocess.DEVNULL
    try:
        cluster.procs["munged"] = subprocess.Popen(
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={root}/munge/munge.socket",
                f"--key-file={key}",
                f"--pid-file={root}/munge/munged.pid",
                f"--log-file={root}/munged.log",
                f"--seed-file={root}/munge/munged.seed",
            ],
            stdout=devnull,
            stderr=subprocess.STDOUT,
        )
        _wait_for(lambda: (root / "munge" / "munge.socket").exists(), 15, "munged socket", cluster)
        env = cluster.env
        cluster.procs["slurmctld"] = subprocess.Popen(
            [_which("slurmctld"), "-D", "-c", "-f", str(conf)], env=env, stdout=devnull, stderr=devnull
        )
        cluster.procs["slurmd"] = subprocess.Popen(
            [_which("slurmd"), "-D", "-f", str(conf), "-N", node], env=env, stdout=devnull, stderr=devnull
        )
        _wait_for(
            lambda: cluster.node_state().split("+")[0] in ("IDLE", "MIXED", "ALLOCATED"),
            timeout,
            "the node to become IDLE",
            cluster,
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(pred, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster._check_daemons()
        try:
            if pred():
                return
        except (subprocess.SubprocessError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")
