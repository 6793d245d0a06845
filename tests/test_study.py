"""Optuna studies end to end, as a user runs them: `python run.py --multirun study=...` and `workbench study
...` as subprocesses, on real SQLite, Optuna, MLflow and Hydra launchers; read back from Optuna and MLflow.
This file: one pruned study, shared by the tests that read it back."""

from __future__ import annotations

import csv
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import (
    ROOT,
    SMALL,
    STUDY,
    cli_env,
    load_study,
    metric_steps,
    run_cli,
    tracking_uri,
    trials_so_far,
    workbench_cli,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


# --- one study of 8 trials with the shipped pruner, shared by the tests that read it back ------------------


@pytest.fixture(scope="module")
def pruned_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, dict]:
    """8 trials of the shipped study on small_cnn and digits, pruned by its percentile pruner (4 epochs;
    its warm-up cut from 4 epochs to 1, so that it can prune). val_loss, a continuous value, so that the
    retrain check below is a tight one. Also returns the worker's resident memory (MB) by trials finished:
    the basic launcher runs it in the launching process."""
    cwd = tmp_path_factory.mktemp("pruned")
    args = [
        f"study={STUDY}",
        "study.n_trials=8",
        "study.metric=val_loss",
        "study.direction=minimize",
        "trainer.epochs=4",
        "study.pruner.n_warmup_steps=1",
        "trainer.deterministic=true",
        *SMALL,
    ]
    command = [sys.executable, str(ROOT / "run.py"), "--multirun", *args]
    with open(cwd / "stdout.txt", "w") as out, open(cwd / "stderr.txt", "w") as err:
        process = subprocess.Popen(command, cwd=cwd, env=cli_env(), stdout=out, stderr=err)
        memory = {}
        while process.poll() is None:
            finished = sum(t.state in FINISHED for t in trials_so_far(cwd))
            memory.setdefault(finished, _rss_mb(process.pid))
            time.sleep(0.5)
    result = subprocess.CompletedProcess(
        command, process.returncode, *((cwd / name).read_text() for name in ("stdout.txt", "stderr.txt"))
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result, memory


def _rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    except (FileNotFoundError, IndexError):  # the process just ended
        return math.nan


def test_the_pruner_prunes_and_every_trial_is_a_child_run(pruned_study, tmp_path: Path) -> None:
    cwd, result, _ = pruned_study
    study = load_study(cwd)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 8 and all(t.state in FINISHED for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and len(pruned) < 8

    client = MlflowClient(tracking_uri(cwd))
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["study"] == STUDY
    assert parent.data.params["space.optimizer.learning_rate"] == "float [0.0001, 0.1], log"
    assert parent.data.params["pruner.name"] == "percentile" and parent.data.params["sampler.name"] == "tpe"
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
        # The number first, which the UI's run-name column never cuts; a pruned run (FINISHED, as a complete
        # one) says so in its name.
        pruned_at = f" (pruned at epoch {run.data.tags['pruned_epoch']})" if trial.state == TrialState.PRUNED else ""
        assert run.info.run_name == f"trial-{trial.number}-{STUDY}{pruned_at}"
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
        assert f"plots/{plot}.png" in artifacts
    assert "plots/plots.html" in artifacts  # every interactive plot, with one copy of plotly.js
    assert {"best_config.yaml", "retrain_command.txt", "trials.csv"} <= artifacts

    # The study in one table, and each searched parameter's importance as a metric.
    rows = list(
        csv.DictReader(Path(client.download_artifacts(parent_id, "trials.csv", str(tmp_path))).read_text().splitlines())
    )
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    for row, trial in zip(rows, trials, strict=True):
        assert (row["state"], row["mlflow_run_id"]) == (trial.state.name, trial.user_attrs["mlflow_run_id"])
        assert int(row["epochs"]) == len(trial.intermediate_values) and row["failure"] == ""
        assert float(row["val_loss"]) == pytest.approx(trial.value)
        assert float(row["optimizer.learning_rate"]) == pytest.approx(trial.params["optimizer.learning_rate"])
    importance = {k: v for k, v in parent.data.metrics.items() if k.startswith("importance.")}
    assert set(importance) == {f"importance.{p}" for p in trials[0].params}
    assert sum(importance.values()) == pytest.approx(1.0, abs=0.01)

    # The closing summary names the best trial, its run and its retrain command.
    best = study.best_trial
    assert f"trial {best.number}: val_loss=" in result.stdout
    assert f"MLflow run {best.user_attrs['mlflow_run_id']}" in result.stdout


def test_trials_in_one_worker_do_not_accumulate_memory(pruned_study) -> None:
    # TensorFlow kept every traced train step alive: 13 MB more per trial here, until the trainer dropped them.
    _, _, memory = pruned_study
    growth = (memory[7] - memory[2]) / 5
    assert growth < 6, f"{growth:.1f} MB a trial: {memory}"


def test_status_shows_trials_by_state_and_the_best(pruned_study) -> None:
    cwd, _, _ = pruned_study
    study = load_study(cwd)
    result = workbench_cli(["study", "status", STUDY], cwd)
    assert result.returncode == 0, result.stderr
    pruned = states(study).count(TrialState.PRUNED)
    assert "8 of 8 finished" in result.stdout
    assert re.search(rf"complete +{8 - pruned}\n", result.stdout) and re.search(rf"pruned +{pruned}\n", result.stdout)
    assert f"trial {study.best_trial.number}: val_loss={study.best_value:.6g}" in result.stdout


def test_best_command_reproduces_the_best_trial(pruned_study) -> None:
    cwd, _, _ = pruned_study
    study = load_study(cwd)
    result = workbench_cli(["study", "best", STUDY], cwd)
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip()
    args = shlex.split(command)  # a shell command: the tags override is quoted
    assert args[:2] == ["python", "run.py"] and not any(a.startswith("study") for a in args)
    assert "trainer.deterministic=true" in command

    retrain = run_cli(args[2:], cwd=cwd)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    run_id = retrain.stdout.split("\nRun ")[1].split()[0]
    value = MlflowClient(tracking_uri(cwd)).get_run(run_id).data.metrics["val_loss"]
    assert value == pytest.approx(study.best_value, rel=1e-6, abs=1e-7)


def test_report_writes_plots_and_the_best_config(pruned_study, tmp_path: Path) -> None:
    cwd, _, _ = pruned_study
    result = workbench_cli(["study", "report", STUDY, "--out", str(tmp_path / "report")], cwd)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "report") in result.stdout
    written = {str(p.relative_to(tmp_path / "report")) for p in (tmp_path / "report").rglob("*") if p.is_file()}
    assert {"best_config.yaml", "retrain_command.txt", "plots/optimization_history.png"} <= written
    assert [p for p in written if p.endswith(".html")] == ["plots/plots.html"]
    assert len([p for p in written if p.endswith(".png")]) == 4
