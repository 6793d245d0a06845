"""Optuna studies end to end, as a user runs them: `python run.py --multirun study=...` and `workbench study
...` as subprocesses, on real SQLite, Optuna, MLflow and Hydra launchers; read back from Optuna and MLflow."""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import ROOT, cli_env, run_cli, tracking_uri
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

STUDY = "lr_batch_decay_dropout"
# Seconds per trial on a CPU: 16-pixel digits, 2 steps per epoch, 2 validation batches.
SMALL = [
    "trainer.steps_per_epoch=2", "trainer.batch_size=16", "model.input_size=16", "trainer.validation_steps=2",
    "tracking.log_model=false", "tracking.checkpoints=none",
]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def multirun(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_cli(["--multirun", *args], cwd=cwd, timeout=timeout)


def workbench(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The `workbench` console command."""
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
        timeout=120,
    )


def load(cwd: Path, name: str = STUDY) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'optuna.db'}")


def trials_so_far(cwd: Path) -> list[optuna.trial.FrozenTrial]:
    """The trials of a study in progress; none before the launching process has created it. Opening the
    storage before then would create the schema too, racing the launcher (one CREATE TABLE fails)."""
    database = cwd / "optuna.db"
    if not database.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(database)) as connection:
            found = connection.execute("SELECT 1 FROM studies WHERE study_name = ?", (STUDY,)).fetchone()
        return load(cwd).get_trials(deepcopy=False) if found else []
    except (sqlite3.OperationalError, optuna.exceptions.StorageInternalError):  # no table yet, or locked
        return []


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --- one study of 8 trials with hyperband, shared by the tests that read it back ------------------------


@pytest.fixture(scope="module")
def hyperband(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, dict]:
    """8 trials of the shipped study on small_cnn and digits, pruned by hyperband (4 epochs: rungs at 1
    and 3). val_loss, a continuous value, so that the retrain check below is a tight one. Also returns the
    worker's resident memory (MB) by trials finished: the basic launcher runs it in the launching process."""
    cwd = tmp_path_factory.mktemp("hyperband")
    args = [
        f"study={STUDY}", "study.n_trials=8", "study.metric=val_loss", "study.direction=minimize",
        "trainer.epochs=4", "trainer.deterministic=true", *SMALL,
    ]
    command = [sys.executable, str(ROOT / "run.py"), "--multirun", *args]
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        process = subprocess.Popen(command, cwd=cwd, env=cli_env(), stdout=out, stderr=err)
        memory = {}
        while process.poll() is None:
            finished = sum(t.state in FINISHED for t in trials_so_far(cwd))
            memory.setdefault(finished, _rss_mb(process.pid))
            time.sleep(0.5)
    result = subprocess.CompletedProcess(command, process.returncode, *(
        (cwd / name).read_text() for name in ("stdout.txt", "stderr.txt")
    ))
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result, memory


def _rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    except (FileNotFoundError, IndexError):  # the process just ended
        return math.nan


def test_hyperband_prunes_and_every_trial_is_a_child_run(hyperband) -> None:
    cwd, result, _ = hyperband
    study = load(cwd)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 8 and all(t.state in FINISHED for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and len(pruned) < 8

    client = MlflowClient(tracking_uri(cwd))
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["study"] == STUDY
    assert parent.data.params["space.optimizer.learning_rate"] == "float [0.0001, 0.1], log"
    assert parent.data.params["pruner.name"] == "hyperband" and parent.data.params["sampler.name"] == "tpe"
    assert parent.data.params["study_file"] == f"studies/{STUDY}.yaml"
    assert parent.data.metrics["trials_complete"] == 8 - len(pruned)
    assert parent.data.metrics["trials_pruned"] == len(pruned)
    assert parent.data.metrics["best_val_loss"] == pytest.approx(study.best_value)
    assert metric_steps(client, parent_id, "trials_complete")[-1] == 8  # logged over time, by trials ended

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["trial_number"] == str(trial.number)
        assert run.data.tags["state"] == trial.state.name
        # The child run is the trial: its parameters are the trial's.
        for key, value in trial.params.items():
            assert run.data.params[key] == str(value)
        epochs = metric_steps(client, run.info.run_id, "val_loss")
        if trial.state == TrialState.PRUNED:
            assert run.data.tags["pruned_epoch"] == str(max(trial.intermediate_values))
            assert epochs == list(range(1, int(run.data.tags["pruned_epoch"]) + 1)) and len(epochs) < 4
        else:
            assert "pruned_epoch" not in run.data.tags and epochs == [1, 2, 3, 4]

    artifacts = {a.path for a in client.list_artifacts(parent_id)} | {
        a.path for a in client.list_artifacts(parent_id, "plots")
    }
    for plot in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"):
        assert {f"plots/{plot}.html", f"plots/{plot}.png"} <= artifacts
    assert {"best_config.yaml", "retrain_command.txt"} <= artifacts

    # The closing summary names the best trial, its run and its retrain command.
    best = study.best_trial
    assert f"trial {best.number}: val_loss=" in result.stdout
    assert f"MLflow run {best.user_attrs['mlflow_run_id']}" in result.stdout


def test_trials_in_one_worker_do_not_accumulate_memory(hyperband) -> None:
    # TensorFlow kept every traced train step alive: 13 MB more per trial here, until the trainer dropped them.
    _, _, memory = hyperband
    growth = (memory[7] - memory[2]) / 5
    assert growth < 6, f"{growth:.1f} MB a trial: {memory}"


def test_status_shows_trials_by_state_and_the_best(hyperband) -> None:
    cwd, _, _ = hyperband
    study = load(cwd)
    result = workbench(["study", "status", STUDY], cwd)
    assert result.returncode == 0, result.stderr
    pruned = states(study).count(TrialState.PRUNED)
    assert "8 of 8 finished" in result.stdout
    assert re.search(rf"complete +{8 - pruned}\n", result.stdout) and re.search(rf"pruned +{pruned}\n", result.stdout)
    assert f"trial {study.best_trial.number}: val_loss={study.best_value:.6g}" in result.stdout


def test_best_command_reproduces_the_best_trial(hyperband) -> None:
    cwd, _, _ = hyperband
    study = load(cwd)
    result = workbench(["study", "best", STUDY], cwd)
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip()
    assert command.startswith("python run.py ") and "study" not in command
    assert "trainer.deterministic=true" in command

    retrain = run_cli(command.split()[2:], cwd=cwd)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    run_id = retrain.stdout.split("\nRun ")[1].split()[0]
    value = MlflowClient(tracking_uri(cwd)).get_run(run_id).data.metrics["val_loss"]
    assert value == pytest.approx(study.best_value, rel=1e-6, abs=1e-7)


def test_report_writes_plots_and_the_best_config(hyperband, tmp_path: Path) -> None:
    cwd, _, _ = hyperband
    result = workbench(["study", "report", STUDY, "--out", str(tmp_path / "report")], cwd)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "report") in result.stdout
    written = {str(p.relative_to(tmp_path / "report")) for p in (tmp_path / "report").rglob("*") if p.is_file()}
    assert {"best_config.yaml", "retrain_command.txt", "plots/optimization_history.png"} <= written
    assert len([p for p in written if p.endswith(".html")]) == 4


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
    first = load(workdir).get_trials()
    client = MlflowClient(tracking_uri(workdir))
    assert [t.state for t in first[:2]] == [TrialState.COMPLETE] * 2
    # The interrupted trial FAILs, its run is KILLED, and it goes back to the study as a WAITING retry
    # (unless Python swallowed the KeyboardInterrupt in a garbage-collection callback: then the trial
    # completes, and no new one starts).
    assert first[2].state in (TrialState.FAIL, TrialState.COMPLETE)
    handed_back = first[2].state == TrialState.FAIL
    if handed_back:
        assert client.get_run(first[2].user_attrs["mlflow_run_id"]).info.status == "KILLED"
        assert first[3].state == TrialState.WAITING and first[3].system_attrs["failed_trial"] == 2
    assert client.get_run(load(workdir).user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"
    complete = [t.state for t in first].count(TrialState.COMPLETE)

    again = multirun(args, workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    left = f"{3 - complete} of 3 trials left" if complete < 3 else "has run its 3 trials"
    assert left in again.stdout, again.stdout
    trials = load(workdir).get_trials()
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
        f"study={STUDY}", "study.n_trials=4", "study.workers=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "study.pruner.name=none", "trainer.epochs=2", *SMALL,
    ]
    result = multirun(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(workdir)
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
    args = [
        f"study={STUDY}", "study.n_trials=1", "study.heartbeat_interval=1", "study.grace_period=2",
        "study.pruner.name=none", "trainer.epochs=8", *SMALL,
    ]
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
    time.sleep(2.5)  # past the grace period

    result = multirun(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    dead, retry = load(workdir).get_trials()
    assert (dead.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.system_attrs["failed_trial"] == 0
    client = MlflowClient(tracking_uri(workdir))
    dead_run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "KILLED" and dead_run.data.tags["state"] == "FAIL"
    retry_run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["retry_of"] == "0"
    # It went on from the dead attempt's checkpoint: its run logged only the epochs after it.
    assert metric_steps(client, retry_run.info.run_id, "val_loss") == list(range(checkpointed + 1, 9))
    assert sorted(retry.intermediate_values) == list(range(1, 9))


# --- failures and multi-objective -------------------------------------------------------------------


def test_a_trial_that_raises_does_not_stop_the_study(workdir: Path) -> None:
    # A batch larger than the 1,437 training images makes the trainer raise for half the draws.
    args = [
        f"study={STUDY}", "study.n_trials=2", "study.params={trainer.batch_size:{choices:[16,4096]}}",
        "trainer.epochs=2", *SMALL,
    ]
    result = multirun(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load(workdir).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2 and failed
    for trial in failed:
        assert trial.params["trainer.batch_size"] == 4096
        assert "larger than the 1437 training images" in trial.user_attrs["error"]


def test_diverging_trials_fail_with_the_reason_and_stop_the_study(workdir: Path) -> None:
    args = [
        f"study={STUDY}", "study.n_trials=3", "study.max_failures=2", "trainer.epochs=2", *SMALL,
        "study.params={optimizer.learning_rate:{low:1.0e+20,high:1.0e+30}}",  # the loss goes NaN
    ]
    result = multirun(args, workdir)
    assert result.returncode == 1
    assert "error: study lr_batch_decay_dropout stopped: 2 trials failed (study.max_failures)" in result.stderr
    study = load(workdir)
    assert states(study) == [TrialState.FAIL, TrialState.FAIL]
    client = MlflowClient(tracking_uri(workdir))
    for trial in study.get_trials():
        assert trial.user_attrs["error"].startswith("Diverged: training loss became nan")
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["state"] == "FAIL"
        assert run.data.tags["workbench.error"].startswith("Diverged")
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FAILED"


def test_multi_objective_study_reports_its_pareto_front(workdir: Path) -> None:
    name = "accuracy_vs_size"
    args = [
        f"study={name}", "study.n_trials=2", "study.params={model:{choices:[small_cnn,mobilenet_v2]}}",
        "trainer.epochs=1", *SMALL, "model.input_size=32",
    ]
    result = multirun(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load(workdir, name)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert {t.params["model"] for t in trials} == {"small_cnn", "mobilenet_v2"}
    front = study.best_trials
    # The front is exactly the trials no other trial beats on both accuracy and size.
    assert {t.number for t in front} == {t.number for t in trials if not any(_dominates(o, t) for o in trials)}
    status = workbench(["study", "status", name], workdir)
    assert status.returncode == 0, status.stderr
    for output in (result.stdout, status.stdout):
        assert f"Pareto front ({len(front)} trials):" in output
        for trial in front:
            accuracy, parameters = trial.values
            assert f"trial {trial.number}: val_accuracy={accuracy:.6g}  parameters={parameters:.6g}" in output
    commands = workbench(["study", "best", name], workdir).stdout
    assert commands.count("python run.py ") == len(front)


def _dominates(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    """a is no worse on both objectives (accuracy up, size down) and better on one."""
    (acc_a, size_a), (acc_b, size_b) = a.values, b.values
    return acc_a >= acc_b and size_a <= size_b and (acc_a, size_a) != (acc_b, size_b)

