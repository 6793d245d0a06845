"""hydra/launcher=slurm_gpu on a real SLURM: a throwaway single-node cluster (tests/slurm_cluster.py) that the
module starts and stops. In CI (root, with the Debian packages .ci/run installs) these never skip."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import slurm_cluster
from helpers import ROOT, TINY, cli_env, run_cli, tracking_uri

# Scaled down by overrides only: this machine's node has 2 CPUs, and 2 GPUs that are device files.
SMALL_JOBS = [
    "hydra/launcher=slurm_gpu",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a running single-node cluster (SLURM_CONF), for the CLI the tests start."""
    why = slurm_cluster.missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM cannot start here and CI needs it: {why}")
        pytest.skip(f"SLURM cannot start here ({why}); run these tests as root with SLURM installed")
    with slurm_cluster.running(tmp_path_factory.mktemp("slurm")) as env:
        yield {**cli_env(), "SLURM_CONF": env["SLURM_CONF"]}


def test_a_grid_runs_as_a_job_array_one_gpu_a_job(slurm: dict[str, str], workdir: Path) -> None:
    grid = ["optimizer=adam,momentum", "model.dropout=0.1,0.3"]
    overrides = [*SMALL_JOBS, "hydra.launcher.gpus_per_node=1", *TINY, "tracking.log_model=false", *grid]
    result = run_cli(["--multirun", *overrides], workdir, env=slurm)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(tracking_uri(workdir))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted((r.data.params["optimizer.name"], r.data.params["model.dropout"]) for r in runs) == [
        ("adam", "0.1"),
        ("adam", "0.3"),
        ("momentum", "0.1"),
        ("momentum", "0.3"),
    ]
    assert {r.info.status for r in runs} == {"FINISHED"}
    # SLURM ran them: one array, four tasks.
    assert len({r.data.tags["slurm.job_id"].split("_")[0] for r in runs}) == 1, [r.data.tags for r in runs]
    # The node's two (fake) GPUs: each job sees only the one SLURM gave it, and its run records which.
    devices = sorted(r.data.tags["cuda_visible_devices"] for r in runs)
    assert set(devices) == {"0", "1"}, devices
    # Accounting is off on this cluster: said once, not a warning from submitit every few seconds.
    console = result.stdout + result.stderr
    assert console.count("SLURM accounting is off") == 1, console[-3000:]
    assert "Bypassing sacct" not in console


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ("hydra.launcher.cpus_per_task=8", "no node of partition debug has more than"),
        ("hydra.launcher.mem_gb=4096", "no node of partition debug has more than"),
        ("hydra.launcher.gpus_per_node=4", "no node of partition debug has more than 2 GPUs"),
        ("hydra.launcher.partition=gpu", "no such partition (sinfo); the partitions: debug, short"),
    ],
)
def test_resources_no_node_has_are_refused_before_anything_is_submitted(
    slurm: dict[str, str], workdir: Path, override: str, why: str
) -> None:
    result = run_cli(["--multirun", *SMALL_JOBS, override, "optimizer=adam,momentum"], workdir, env=slurm)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {override}: {why}"), result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == [], "nothing written: no store, no sweep folder"


def test_a_job_that_can_never_start_is_named_with_squeue_s_reason(slurm: dict[str, str], workdir: Path) -> None:
    # Partition `short` allows 1 minute; the job asks for 5: SLURM keeps it pending for ever. sinfo would
    # tell that too, but the launcher checks only what no waiting changes: CPUs, memory, GPUs.
    args = [*SMALL_JOBS, "hydra.launcher.partition=short", "hydra.launcher.timeout_min=5", *TINY]
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "--multirun", *args],
        cwd=workdir,
        env=slurm,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, seen = time.monotonic() + 120, []
        assert launcher.stdout is not None
        while time.monotonic() < deadline:
            line = launcher.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "cannot start" in line:
                break
        named = [line for line in seen if "cannot start" in line]
        assert named, "".join(seen)[-3000:]
        assert "(squeue: PartitionConfig)" in named[0] and "timeout_min" in named[0], named[0]
    finally:
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
        subprocess.run(["scancel", "--partition=short"], env=slurm, check=False)
