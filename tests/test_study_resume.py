"""Studies across launches and workers: the budget counted over restarts, an interrupted study rerun,
parallel workers, a dead worker's trial retried from its checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import (
    ROOT,
    SMALL,
    STUDY,
    cli_env,
    load_study,
    metric_steps,
    multirun,
    tracking_uri,
    trials_so_far,
)
from workbench.study import causes

# --- budget, resume and workers ---------------------------------------------------------------------


def test_interrupted_study_reruns_only_the_remainder(workdir: Path) -> None:
    args = [f"study={STUDY}", "study.n_trials=3", "study.pruner.name=none", "trainer.epochs=3", *SMALL]
    command = [sys.executable, str(ROOT / "run.py"), "--multirun", *args]
    process = subprocess.Popen(command, cwd=workdir, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Ctrl-C while the third trial is training.
    while not _training_third_trial(workdir):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    first = load_study(workdir).get_trials()
    client = MlflowClient(tracking_uri(workdir))
    assert [t.state for t in first[:2]] == [TrialState.COMPLETE] * 2
    # The interrupted trial FAILs, its run is KILLED, and it goes back to the study as a WAITING retry
    # (unless Python swallowed the KeyboardInterrupt in a garbage-collection callback: then the trial
    # completes, and no new one starts).
    assert first[2].state in (TrialState.FAIL, TrialState.COMPLETE)
    handed_back = first[2].state == TrialState.FAIL
    if handed_back:
        # KILLED; or FINISHED when the stop came after its last epoch's training, before Optuna was told.
        status = client.get_run(first[2].user_attrs["mlflow_run_id"]).info.status
        assert status == "KILLED" or (status == "FINISHED" and len(first[2].intermediate_values) == 3), status
        assert first[2].user_attrs["failure"] == "preempted"
        assert client.get_run(first[2].user_attrs["mlflow_run_id"]).data.tags["workbench.failure"] == "preempted"
        assert first[3].state == TrialState.WAITING and first[3].system_attrs["failed_trial"] == 2
    assert client.get_run(load_study(workdir).user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"
    complete = [t.state for t in first].count(TrialState.COMPLETE)

    again = multirun(args, workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    left = f"{3 - complete} of 3 trials left" if complete < 3 else "has run its 3 trials"
    assert left in again.stdout, again.stdout
    trials = load_study(workdir).get_trials()
    # The rerun ran the queued retry and nothing more: no new trial numbers.
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3 and len(trials) == len(first)
    assert TrialState.RUNNING not in [t.state for t in trials]
    done = len(first[2].intermediate_values)
    if handed_back and done < 3:
        # The retry went on from the interrupted trial's epoch checkpoint. A trial reports an epoch before it
        # checkpoints it, so a stop between the two leaves `done` epochs reported and `done - 1` saved.
        # (One stopped after its last epoch, while logging, trains again: a new run needs metrics.)
        assert min(metric_steps(client, trials[3].user_attrs["mlflow_run_id"], "loss")) in (done, done + 1)
    # The two complete trials were not run again: same numbers, parameters and runs.
    for before, after in zip(first[:2], trials[:2], strict=True):
        assert (after.number, after.params, after.user_attrs) == (before.number, before.params, before.user_attrs)


def _training_third_trial(cwd: Path) -> bool:
    trials = trials_so_far(cwd)
    return len(trials) == 3 and trials[2].state == TrialState.RUNNING and bool(trials[2].intermediate_values)


def test_two_parallel_workers_share_the_budget_exactly(workdir: Path) -> None:
    args = [
        f"study={STUDY}",
        "study.n_trials=4",
        "study.workers=2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "study.pruner.name=none",
        "trainer.epochs=2",
        *SMALL,
    ]
    result = multirun(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(workdir)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Two worker processes ran at the same time: their trials overlap.
    first_ends = min(t.datetime_complete for t in trials)
    assert sum(t.datetime_start < first_ends for t in trials) == 2
    client = MlflowClient(tracking_uri(workdir))
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    for trial in trials:
        assert client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent_id


def test_a_dead_workers_trial_is_retried_from_its_last_checkpoint(workdir: Path) -> None:
    # The default heartbeat grace period (180 s) stays: a worker of this host whose process is gone is dead
    # at once, and the rerun, started straight away, retries its trial.
    args = [f"study={STUDY}", "study.n_trials=1", "study.pruner.name=none", "trainer.epochs=8", *SMALL]
    command = [sys.executable, str(ROOT / "run.py"), "--multirun", *args]
    process = subprocess.Popen(command, cwd=workdir, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = workdir / "checkpoints" / STUDY / "trial-0" / "state.json"
    while not (state.is_file() and json.loads(state.read_text())["epoch"] >= 2):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    process.kill()  # the worker dies: no Python code runs, the trial stays RUNNING
    process.wait()
    checkpointed = json.loads(state.read_text())["epoch"]
    assert checkpointed < 8, "killed too late: the trial had trained all its epochs"

    result = multirun(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    dead, retry = load_study(workdir).get_trials()
    assert (dead.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.system_attrs["failed_trial"] == 0
    client = MlflowClient(tracking_uri(workdir))
    dead_run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "KILLED" and dead_run.data.tags["state"] == "FAIL"
    assert causes.of_trial(dead) == "lost" and dead_run.data.tags["workbench.failure"] == "lost"
    assert retry.user_attrs.get("failure") is None, "the retry does not inherit the cause"
    assert not list(workdir.rglob("outbox")), "the dead run's outbox, ended by the retry, is gone"
    retry_run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["retry_of"] == "0"
    # It went on from the dead attempt's checkpoint: its run logged only the epochs after it.
    assert metric_steps(client, retry_run.info.run_id, "val_loss") == list(range(checkpointed + 1, 9))
    assert sorted(retry.intermediate_values) == list(range(1, 9))
