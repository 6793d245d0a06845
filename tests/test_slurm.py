"""hydra/launcher=slurm_gpu on a real SLURM: a throwaway single-node cluster (tests/slurm_cluster.py) that the
module starts and stops. In CI (root, with the Debian packages .ci/run installs) these never skip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

import slurm_cluster
from helpers import (
    ROOT,
    STUDY,
    TINY,
    TrackingServer,
    check_study,
    cli_env,
    cluster_study,
    no_secret,
    postgres_study,
    run_cli,
    tracking_uri,
    wait_for_a_trial_after_epoch,
    wait_until_done,
    with_password,
)

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


def _study(postgres_url: str, server: str, *extra: str, workers: int) -> list[str]:
    resources = [o for o in SMALL_JOBS if not o.startswith("hydra/launcher=")]
    return cluster_study(postgres_url, server, *resources, *extra, workers=workers, launcher="slurm_gpu")


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _job_state(slurm: dict[str, str], job: str) -> str:
    """scontrol's record of a job: it keeps an ended one for MinJobAge (300 s)."""
    return subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout


def _wait_until_ended(slurm: dict[str, str], job: str, timeout: float = 150) -> None:
    """Until no task of the job (or array) is pending, running or completing: SLURM enforces a time limit up
    to 30 s late, then gives KillWait (10 s) after its SIGTERM."""
    deadline = time.monotonic() + timeout
    while True:
        listing = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=slurm, capture_output=True, text=True)
        if not listing.stdout.strip() and (listing.returncode == 0 or "Invalid job id" in listing.stderr):
            return
        assert time.monotonic() < deadline, f"job {job} still {listing.stdout.split()}"
        time.sleep(0.5)


def _a_trial_of_the_first_job_after_epoch(
    postgres_url: str, study_proc: subprocess.Popen, client: MlflowClient, epoch: int
) -> tuple[FrozenTrial, str]:
    """A running trial of the array's task 0 past `epoch`, and that job. The launcher waits for its jobs in
    order: with task 0 dead it gives up (after submitit's 15 s for a result file) while the others work on."""
    deadline, jobs = time.monotonic() + 600, {}
    while time.monotonic() < deadline:
        assert study_proc.poll() is None, f"the study ended first:\n{study_proc.communicate()[0][-4000:]}"
        try:
            running = postgres_study(postgres_url).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # no study yet
            running = []
        for trial in running:
            if "failed_trial" in trial.system_attrs or "mlflow_run_id" not in trial.user_attrs:
                continue
            if trial.number not in jobs:  # its run is tagged with its job when it starts
                jobs[trial.number] = client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags["slurm.job_id"]
            if jobs[trial.number].endswith("_0") and len(trial.intermediate_values) >= epoch:
                return trial, jobs[trial.number]
        time.sleep(0.2)
    raise AssertionError(f"no trial of task 0 reached epoch {epoch}")


def test_a_study_of_three_slurm_workers_runs_its_trials_though_one_is_killed(
    slurm: dict[str, str], workdir: Path, postgres_url: str, mlflow_server: TrackingServer
) -> None:
    """SIGKILL to one worker's job step (as a dead node or the OOM killer): no hand-back; another worker
    retries its trial from the epoch checkpoint, and the study still runs exactly its trials."""
    storage = with_password(postgres_url)  # which must reach no log, param, tag or artifact
    args = _study(storage, mlflow_server.url, "study.n_trials=5", "trainer.epochs=6", workers=3)
    study_proc = _start(args, workdir, slurm)
    client = MlflowClient(mlflow_server.url)
    # A trial reports an epoch before it checkpoints it: once epoch 2 is reported, epoch 1 is saved.
    victim, job = _a_trial_of_the_first_job_after_epoch(postgres_url, study_proc, client, epoch=2)
    # SIGKILL to the job's step, the worker: at once. (To the whole job, scancel sends SIGTERM first, which
    # the worker answers by handing its trial back.)
    subprocess.run(["scancel", "--signal=KILL", f"{job}.0"], env=slurm, check=True)
    output, _ = study_proc.communicate(timeout=900)
    # submitit reports the killed job as failed, so the sweep ends with an error (it may end before the
    # other workers do): wait for them to finish the study.
    assert study_proc.returncode == 1 and f"Job {job} " in output, output[-4000:]
    wait_until_done(postgres_url, 5)
    _wait_until_ended(slurm, job.split("_")[0])
    record = _job_state(slurm, job)
    assert "JobState=FAILED" in record, record
    log = "".join(p.read_text() for p in workdir.glob(f"multirun/*/*/.submitit/{job}/*_log.out"))
    assert "goes back to the study" not in log, log[-3000:]  # killed outright: no hand-back

    trials = check_study(postgres_study(postgres_url), mlflow_server.url, n_trials=5)
    no_secret(workdir, mlflow_server.artifacts, output, client)
    jobs = {client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["slurm.job_id"] for t in trials}
    assert len({j.split("_")[0] for j in jobs}) == 1 and len(jobs) >= 2, jobs  # one array, several workers
    # On this one node a worker sees the dead one's process gone; across nodes its heartbeat goes stale.
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    # It went on from the lost trial's last epoch checkpoint: fewer than 6 epochs trained again.
    epochs = [m.step for m in client.get_metric_history(retry.user_attrs["mlflow_run_id"], "loss")]
    assert min(epochs) > 1 and max(epochs) == 6, epochs


def test_a_preempted_worker_hands_its_trial_back_and_the_requeued_job_works_on(
    slurm: dict[str, str], workdir: Path, postgres_url: str, mlflow_server: TrackingServer
) -> None:
    """SLURM's preemption: the pre-timeout signal (SIGUSR2) to a running worker, then the job requeued."""
    args = _study(postgres_url, mlflow_server.url, "study.n_trials=3", "trainer.epochs=6", workers=2)
    study_proc = _start(args, workdir, slurm)
    # A trial reports an epoch before it checkpoints it: once epoch 3 is reported, epoch 2 is saved.
    victim = wait_for_a_trial_after_epoch(postgres_url, study_proc, epoch=3)
    client = MlflowClient(mlflow_server.url)
    job = client.get_run(victim.user_attrs["mlflow_run_id"]).data.tags["slurm.job_id"]
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm, check=True)
    deadline = time.monotonic() + 120
    while client.get_run(victim.user_attrs["mlflow_run_id"]).info.status != "KILLED":
        assert time.monotonic() < deadline, "the signalled worker did not end its run KILLED"
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)
    output, _ = study_proc.communicate(timeout=900)
    assert study_proc.returncode == 0, output[-4000:]
    record = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout
    assert "Restarts=1" in record, record  # the requeued job ran again

    trials = check_study(postgres_study(postgres_url), mlflow_server.url, n_trials=3)
    (resumed,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    # It went on from the handed-back trial's last epoch checkpoint: fewer than 6 epochs trained again.
    epochs = [m.step for m in client.get_metric_history(resumed.user_attrs["mlflow_run_id"], "loss")]
    assert min(epochs) > 2 and max(epochs) == 6, epochs


def test_a_worker_at_its_time_limit_hands_its_trial_back_before_slurm_ends_the_job(
    slurm: dict[str, str], workdir: Path, postgres_url: str, mlflow_server: TrackingServer
) -> None:
    """A 1-minute job: SLURM's warning before the limit (SIGUSR2, submitit's --signal) stops the worker's
    trial, which goes back to the study with its checkpoint, and the job ends on its own before the kill."""
    # slurmctld looks at time limits every 30 s: it sends the warning 10 to 40 s before the limit
    # (signal_delay_s, plus up to 30 s early), and ends the job 0 to 30 s after it. The worker has at least
    # 20 s to start training (it takes under 10 s), and at least 30 s from the warning to the kill.
    limit = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=10"]
    args = _study(postgres_url, mlflow_server.url, *limit, "study.n_trials=1", "trainer.epochs=1000", workers=1)
    result = run_cli(args, workdir, env=slurm)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-4000:]

    trials = postgres_study(postgres_url).get_trials(deepcopy=False)
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    # (No trial at all: the warning came before the worker had started one.)
    assert len(stopped) == 1 and len(trials) == 2, [(t.number, t.state.name) for t in trials]
    client = MlflowClient(mlflow_server.url)
    job = client.get_run(stopped[0].user_attrs["mlflow_run_id"]).data.tags["slurm.job_id"]
    _wait_until_ended(slurm, job)  # the launcher returns once the job has written its result
    record = _job_state(slurm, job)
    assert "JobState=COMPLETED" in record, record  # not TIMEOUT: the worker returned before SLURM ended it
    logs = "".join(p.read_text() for p in workdir.glob(f"multirun/*/*/.submitit/{job}/*_log.*"))
    assert "Worker 0 was stopped (SIGUSR2); its trial goes back" in logs, logs[-4000:]
    assert "Caught signal" not in logs and "Traceback" not in logs, logs[-4000:]  # not submitit's handler
    run = client.get_run(stopped[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags.get("workbench.stopped") == "interrupted (SIGUSR2)", run.data.tags

    # Queued again, to go on from the stopped trial's epoch checkpoint at the next launch.
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.system_attrs.get("failed_trial") == stopped[0].number, retry.system_attrs
    state = json.loads((workdir / "checkpoints" / STUDY / f"trial-{stopped[0].number}" / "state.json").read_text())
    assert 1 <= state["epoch"] <= len(retry.intermediate_values) < 1000, (
        state["epoch"],
        len(retry.intermediate_values),
    )
