"""A real one-node Slurm cluster on this machine, for the tests of the slurm launcher.

Those tests submit real jobs (sbatch, job arrays, requeue), which a fake cannot stand in for. CI runs as
root and starts the cluster with `python tests/slurm_cluster.py start`; anywhere else `start_cluster()`
returns the one-line reason the tests skip with (Slurm not installed, not root, daemons would not come up).
The node is `localhost` with the CPUs and memory that `slurmd -C` reports, no accounting and no cgroups.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
LOGS = Path("/var/log/slurm")
STATE = Path("/var/lib/slurm")
SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
READY = {"idle", "mixed", "allocated", "completing"}
INSTALL = "apt-get install slurmctld slurmd slurm-client munge"


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def _run(*cmd: str, timeout: float = 15.0, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (found in sbin too); a missing program or a timeout reads as a failed run (rc 127 / 124)."""
    try:
        return subprocess.run((_which(cmd[0]) or cmd[0], *cmd[1:]), input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]}: timed out")


def _start(*cmd: str) -> None:
    """Start a daemon that forks itself away (its output goes to its own log file), from / so that it holds
    no test's folder."""
    subprocess.run((_which(cmd[0]) or cmd[0], *cmd[1:]), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd="/", timeout=30, check=False)


def _states() -> list[str]:
    """The node states sinfo reports (empty when the controller does not answer; `scontrol ping` says so at once
    where sinfo would retry for 9 s)."""
    if _run("scontrol", "ping", timeout=10).returncode != 0:
        return []
    done = _run("sinfo", "-h", "-o", "%T", timeout=10)
    return done.stdout.split() if done.returncode == 0 else []


def _running(name: str) -> bool:
    return _run("pgrep", "-x", name, timeout=5).returncode == 0


def _munge_ok() -> bool:
    cred = _run("munge", "-n", timeout=5)
    return cred.returncode == 0 and _run("unmunge", stdin=cred.stdout, timeout=5).returncode == 0


def _log_hint(log: Path) -> str:
    """The last fatal (else error) line of a daemon log, to say why it did not come up; the errors every start
    logs because Debian's mpi/pmix plugins lack their library are no reason."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if "pmix" not in line.lower()]
    except OSError:
        return f"no log at {log}"
    for word in ("fatal", "error"):
        found = [line for line in lines if word in line and "MPI:" not in line]
        if found:
            return f"{log}: {found[-1].strip()}"
    return f"see {log}"


def _node_line() -> str:
    """The hardware part of the NodeName line: slurmd -C's topology and memory, so the node is never drained
    for having less than configured (memory kept 5% below what slurmd detects)."""
    fields = dict(kv.split("=", 1) for kv in _run("slurmd", "-C").stdout.split() if "=" in kv)
    cpus = fields.get("CPUs", str(os.cpu_count() or 1))
    memory = max(int(int(fields.get("RealMemory", "1024")) * 0.95), 1)
    topology = " ".join(f"{k}={fields[k]}" for k in ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
                        if k in fields)
    return f"CPUs={cpus} {topology} RealMemory={memory}".replace("  ", " ")


def _write_conf() -> None:
    for folder in (LOGS, STATE / "slurmctld", STATE / "slurmd"):
        folder.mkdir(parents=True, exist_ok=True)
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(f"""\
# written by tests/slurm_cluster.py: a one-node test cluster, no accounting, no cgroups
ClusterName=testcluster
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again only cred_expire+1 s later (default 120)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=0
ReturnToService=2
JobRequeue=1
StateSaveLocation={STATE}/slurmctld
SlurmdSpoolDir={STATE}/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile={LOGS}/slurmctld.log
SlurmdLogFile={LOGS}/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
MinJobAge=10
Waittime=0
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 {_node_line()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")


def _start_munge() -> str | None:
    if _munge_ok():
        return None
    user = pwd.getpwnam("munge")
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        os.chown(MUNGE_KEY, user.pw_uid, user.pw_gid)
        MUNGE_KEY.chmod(0o400)
    for folder in (Path("/run/munge"), Path("/var/lib/munge"), Path("/var/log/munge")):
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, user.pw_uid, user.pw_gid)
    _start("runuser", "-u", "munge", "--", _which("munged") or "/usr/sbin/munged")
    return None if _munge_ok() else f"munged would not start: {_log_hint(Path('/var/log/munge/munged.log'))}"


def start_cluster(timeout_s: float = 60.0) -> str | None:
    """None once the one-node cluster is up with its node ready to run jobs, else why not (one line).

    A cluster already up is left as it is; the config is written only when neither daemon runs."""
    for tool in ("sbatch", "sinfo", "scontrol", "slurmctld", "slurmd", "munged", "munge"):
        if _which(tool) is None:
            return f"{tool} not installed ({INSTALL})"
    states = _states()
    if READY & set(states):
        return None
    if os.geteuid() != 0:
        return "not root: cannot start slurmctld/slurmd" + (f" (node is {','.join(states)})" if states else "")
    with open("/run/slurm_cluster.lock", "w") as lock:  # one starter at a time (pytest -n workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        reason = _start_munge()
        if reason:
            return reason
        ctld, slurmd = _running("slurmctld"), _running("slurmd")
        if not ctld and not slurmd:
            _write_conf()
        if not ctld:
            _start("slurmctld")
        if not slurmd:
            _start("slurmd", "-N", "localhost")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = _states()
        if READY & set(states):
            return None
        if {"down", "drained", "draining"} & set(states):  # responding but marked down: put it back
            _run("scontrol", "update", "nodename=localhost", "state=resume")
        time.sleep(0.5)
    if not _running("slurmctld"):
        return f"slurmctld is not running: {_log_hint(LOGS / 'slurmctld.log')}"
    if not _running("slurmd"):
        return f"slurmd is not running: {_log_hint(LOGS / 'slurmd.log')}"
    why = " ".join([",".join(states) or "unknown", *_run("sinfo", "-h", "-R", "-o", "%E").stdout.split()])
    return f"slurm node not ready after {timeout_s:.0f}s (state {why})"


def stop_cluster() -> None:
    """Stop the daemons (local cleanup): slurmctld and slurmd through scontrol, then munged."""
    _run("scontrol", "shutdown")
    for name in ("slurmd", "slurmctld"):  # in case the controller did not answer: the pid files' daemons
        try:
            pid = int(Path(f"/run/{name}.pid").read_text())
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                os.kill(pid, 15)
        except (OSError, ValueError):
            pass
    _run("munged", "--stop")


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action == "start":
        why = start_cluster()
        print(why or "slurm: ready")
        sys.exit(1 if why else 0)
    if action == "stop":
        stop_cluster()
        sys.exit(0)
    sys.exit("usage: python tests/slurm_cluster.py start|stop")
