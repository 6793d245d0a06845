"""SLURM, seen from the launching process: resources no node has are refused before anything is submitted,
and job states come from squeue when accounting (sacct) is off.

Hydra's submitit launcher asks `sacct` for job states every few seconds. Many small clusters run without
accounting, where every call fails and submitit prints the same warning each time, and a pending job that
can never start (it asks for more than the partition has) waits in silence. submitit has no option for
either: `QuietWatcher` replaces its state watcher (a class attribute of SlurmJob) with one that says once
that accounting is off, asks squeue instead, and names the reason squeue gives for a job that cannot start.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from workbench.config import ConfigError

log = logging.getLogger(__name__)

# squeue's reasons for a pending job that no waiting will start (`man squeue`, JOB REASON CODES).
NEVER_STARTS = {
    "PartitionConfig": "it asks for more than the partition allows (CPUs, memory, GPUs or time: timeout_min)",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows",
    "PartitionTimeLimit": "its time limit (hydra.launcher.timeout_min) is above the partition's",
    "BadConstraints": "no node has what it asks for",
    "InvalidAccount": "its account is not valid",
    "InvalidQOS": "its QOS is not valid",
}


@dataclass(frozen=True)
class Node:
    cpus: int
    memory_mb: int
    gpus: int


def check_resources(launcher: Mapping[str, Any]) -> None:
    """Refuse hydra.launcher.* values that no node of the partition can satisfy, as sinfo tells; warn when
    sinfo cannot tell (not installed here, or no answer)."""
    partition = launcher.get("partition")
    nodes = _nodes(partition)
    if nodes is None:
        log.warning("sinfo did not answer here: hydra.launcher resources are not checked before submitting")
        return
    if not nodes:
        raise ConfigError(
            f"hydra.launcher.partition={partition}: no such partition (sinfo); "
            f"the partitions: {', '.join(_partitions())}"
        )
    where = f"partition {partition}" if partition else "the default partition"
    asked = Node(
        cpus=int(launcher.get("cpus_per_task") or 1) * int(launcher.get("tasks_per_node") or 1),
        memory_mb=int(launcher.get("mem_gb") or 0) * 1024,
        gpus=int(launcher.get("gpus_per_node") or 0),
    )
    if any(n.cpus >= asked.cpus and n.memory_mb >= asked.memory_mb and n.gpus >= asked.gpus for n in nodes):
        return
    for key, field, unit in (
        ("cpus_per_task", "cpus", "CPUs"),
        ("mem_gb", "memory_mb", "MB"),
        ("gpus_per_node", "gpus", "GPUs"),
    ):
        most = max(getattr(n, field) for n in nodes)
        if getattr(asked, field) > most:
            raise ConfigError(
                f"hydra.launcher.{key}={launcher.get(key)}: no node of {where} has more than {most} {unit} (sinfo); "
                "ask for less, or choose another hydra.launcher.partition"
            )
    raise ConfigError(
        f"hydra.launcher: no node of {where} has {asked.cpus} CPUs, {asked.memory_mb} MB and {asked.gpus} GPUs "
        "at once (sinfo); ask for less, or choose another hydra.launcher.partition"
    )


def _sinfo(*args: str) -> list[str] | None:
    if shutil.which("sinfo") is None:
        return None
    try:
        result = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return None
    return result.stdout.splitlines() if result.returncode == 0 else None


def _partitions() -> list[str]:
    return [line.rstrip("*") for line in _sinfo("-o", "%P") or []]


def _nodes(partition: str | None) -> list[Node] | None:
    """The nodes of the partition (the default one when None); None when sinfo does not answer."""
    if partition is None:
        default = [line for line in _sinfo("-o", "%P") or [] if line.endswith("*")]
        partition = default[0].rstrip("*") if default else None
    lines = _sinfo("-N", "-o", "%c|%m|%G", *(["-p", partition] if partition else []))
    if lines is None:
        return None
    nodes = []
    for line in lines:
        cpus, memory, gres = line.split("|")
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        nodes.append(Node(int(cpus.rstrip("+")), int(memory.rstrip("+")), gpus))
    return nodes


def watch_quietly() -> None:
    """Give submitit's SLURM jobs the QuietWatcher (call before the launcher submits)."""
    if not isinstance(SlurmJob.watcher, QuietWatcher):
        # A look at least every minute: squeue forgets an ended job MinJobAge (300 s) later, and a job that
        # died without a result (SIGKILL, OOM) would then look RUNNING to the launcher for ever.
        SlurmJob.watcher = QuietWatcher(delay_s=60)


class QuietWatcher(SlurmInfoWatcher):
    """sacct while it answers; once it says accounting is off, squeue, which knows a job until MinJobAge
    (300 s by default) after it ends: plenty for a launcher that polls every minute at most."""

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s)
        self.use_squeue = False
        self.reported: set[str] = set()

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()
        if command is None or not self.use_squeue:
            return command
        ids = ",".join(command[i + 1] for i, word in enumerate(command) if word == "-j")
        return ["squeue", "--states=all", "-h", "-o", "%i|%T|%N|%r", "-j", ids]

    def update(self) -> None:
        command = self._make_command()
        if command is not None and not self.use_squeue:
            probe = subprocess.run(command, capture_output=True, text=True, check=False)
            if probe.returncode != 0 and "accounting storage is disabled" in probe.stderr:
                self.use_squeue = True
                log.warning(
                    "SLURM accounting is off (sacct: %s): job states come from squeue instead, which forgets a "
                    "job MinJobAge (300 s by default) after it ends",
                    probe.stderr.strip(),
                )
        super().update()

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if not self.use_squeue:
            return super().read_info(string)
        text = string.decode() if isinstance(string, bytes) else string
        info: dict[str, dict[str, str]] = super().read_info("JobID|State|NodeList|Reason\n" + text)
        for job_id, stats in info.items():
            reason = stats.get("Reason", "")
            if stats.get("State") == "PENDING" and reason in NEVER_STARTS and job_id not in self.reported:
                self.reported.add(job_id)
                log.error(
                    "SLURM job %s cannot start (squeue: %s): %s; scancel it and change hydra.launcher.*",
                    job_id,
                    reason,
                    NEVER_STARTS[reason],
                )
        return info
