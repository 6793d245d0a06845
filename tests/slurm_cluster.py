"""A throwaway single-node SLURM cluster in a folder: rehearse the cluster path on one machine.

    python tests/slurm_cluster.py up /tmp/slurm      # prints the line that points sbatch, squeue... at it
    export SLURM_CONF=/tmp/slurm/slurm.conf
    python run.py --multirun hydra/launcher=slurm_gpu hydra.launcher.partition=debug ...
    python tests/slurm_cluster.py down /tmp/slurm    # stops its daemons; nothing is left running

Needs Debian's (or any distribution's) `slurmctld`, `slurmd`, `slurm-client` and `munge` packages and root
(slurmd starts jobs as their users). Everything else lives in the folder: slurm.conf, a munge socket of its
own, state, spool, logs. The node is this machine, with its CPUs and memory; accounting is off, as on many
small clusters. The tests use `running(folder)`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PARTITION = "debug"
GPUS = 2  # fake ones: CUDA_VISIBLE_DEVICES tells each job which are its own, nothing runs on them
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")
INSTALL = "apt-get install -y slurmctld slurmd slurm-client munge"
MUNGE_KEY = Path("/etc/munge/munge.key")


class Unavailable(RuntimeError):
    """This machine cannot run the cluster (no SLURM packages, not root); the message says why and the fix."""


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [p for p in PROGRAMS if shutil.which(p) is None]
    if absent:
        return f"{', '.join(absent)} not installed: {INSTALL} (as root)"
    if os.geteuid() != 0:
        return "slurmd must run as root (it starts jobs as their users)"
    if not MUNGE_KEY.is_file():
        return f"no {MUNGE_KEY}: the munge package creates it"
    return None


def env(folder: Path) -> dict[str, str]:
    """The environment that points SLURM's commands at the cluster in `folder`."""
    return {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}


def up(folder: Path, timeout: float = 60) -> None:
    """Write the config and start munged, slurmctld and slurmd; return once the node takes jobs."""
    why = missing()
    if why:
        raise Unavailable(why)
    folder = folder.resolve()
    for sub in ("state", "spool", "log", "dev"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index in range(GPUS):  # device files stand in for /dev/nvidia* (major 195): nothing is behind them
        device = folder / "dev" / f"nvidia{index}"
        if not device.exists():
            os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(195, index))
    (folder / "slurm.conf").write_text(_config(folder))
    (folder / "gres.conf").write_text(
        f"NodeName={socket.gethostname()} Name=gpu File={folder}/dev/nvidia[0-{GPUS - 1}]\n"
    )
    subprocess.run(
        [
            "munged",
            "--force",  # as root, with a socket of its own: the machine's munge service is left alone
            f"--socket={folder / 'munge.socket'}",
            f"--key-file={MUNGE_KEY}",
            f"--pid-file={folder / 'munged.pid'}",
            f"--log-file={folder / 'log' / 'munged.log'}",
            f"--seed-file={folder / 'munged.seed'}",
        ],
        check=True,
    )
    subprocess.run(["slurmctld", "-f", str(folder / "slurm.conf")], check=True, env=env(folder))
    subprocess.run(["slurmd", "-f", str(folder / "slurm.conf")], check=True, env=env(folder))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env(folder), check=False
        ).stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            return
        time.sleep(0.2)
    down(folder)
    raise Unavailable(f"the node did not come up in {timeout:.0f} s; see {folder / 'log'}")


def down(folder: Path, timeout: float = 30) -> None:
    """Stop the cluster's jobs, then its daemons (slurmd, slurmctld, munged), waiting until each has ended."""
    folder = folder.resolve()
    if (folder / "slurmctld.pid").is_file():
        subprocess.run(["scancel", "--quiet", "--user", "root"], env=env(folder), check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _jobs(folder):
            time.sleep(0.1)
    for name in ("slurmd", "slurmctld", "munged"):
        pid_file = folder / f"{name}.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running(folder: Path) -> Iterator[dict[str, str]]:
    """A cluster for the duration of the block; yields the environment that points at it."""
    up(folder)
    try:
        yield env(folder)
    finally:
        down(folder)


def _jobs(folder: Path) -> list[str]:
    """The cluster's jobs that have not ended (an unanswered squeue counts as none)."""
    listing = subprocess.run(
        ["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, env=env(folder), check=False, timeout=30
    )
    return listing.stdout.split("\n")[:-1] if listing.returncode == 0 else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False


def _free_port() -> int:
    """A port nothing listens on now: clusters of other folders (or a real one) keep theirs."""
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(folder: Path) -> str:
    host = socket.gethostname()
    cpus = len(os.sched_getaffinity(0))
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024  # some for the OS
    return f"""# A throwaway single-node cluster (tests/slurm_cluster.py)
ClusterName=workbench
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={folder / "munge.socket"}
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "log" / "slurmctld.log"}
SlurmdLogFile={folder / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
KillWait=10
MinJobAge=300
GresTypes=gpu
NodeName={host} CPUs={cpus} RealMemory={memory_mb} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes={host} MaxTime=1 State=UP
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    try:
        if args.action == "up":
            up(args.folder)
            print(f"export SLURM_CONF={args.folder.resolve() / 'slurm.conf'}")
        else:
            down(args.folder)
    except Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
