"""k-fold cross-validation (trainer.cv_folds): folds, the CV run and its fold runs, resume, refusals, and a
study that prunes across folds with Optuna's WilcoxonPruner."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import (
    ROOT,
    STUDY,
    TINY,
    cli_env,
    compose_config,
    load_study,
    metric_steps,
    multirun,
    run_cli,
    tracking_uri,
)
from workbench import sources
from workbench.config import ConfigError
from workbench.train import train

# Folds of a few seconds: long enough to stop one midway, whatever the machine's load.
CV_ARGS = ["trainer.epochs=3", "trainer.steps_per_epoch=20", "trainer.batch_size=16", "model.input_size=16",
           "trainer.validation_steps=3", "tracking.log_model=false"]  # fmt: skip


def test_folds_are_stratified_disjoint_and_cover_the_training_split() -> None:
    source = sources.load(compose_config().data, 16)
    folds = sources.folds(source, 3)
    assert len(folds) == 3
    # Each example of the training split is validated in exactly one fold, and trained on in the others.
    held = [fold.val.images for fold in folds]
    everything = np.concatenate([source.train.images, *held]).reshape(len(source.train) * 2, -1)
    _, counts = np.unique(everything, axis=0, return_counts=True)
    duplicates_in_train = len(source.train) - len(np.unique(source.train.images.reshape(len(source.train), -1), axis=0))
    assert sum(len(fold.val) for fold in folds) == len(source.train)
    assert (counts % 2 == 0).all() and duplicates_in_train == 0  # each image twice: in train, in one fold
    for fold in folds:
        assert len(fold.train) + len(fold.val) == len(source.train)
        # Stratified: every class in proportion, to within one example.
        expected = np.bincount(source.train.labels) / 3
        assert np.abs(np.bincount(fold.val.labels, minlength=10) - expected).max() <= 1
    # The source's own validation split is not among them.
    assert all(fold.val.images is not source.val.images for fold in folds)
    # A fixed seed: the same folds every time.
    again = sources.folds(source, 3)
    assert all((a.val.labels == b.val.labels).all() for a, b in zip(folds, again, strict=True))


def test_a_class_with_fewer_examples_than_folds_is_refused() -> None:
    source = sources.load(compose_config().data, 16)
    source.train.labels = source.train.labels.copy()
    source.train.labels[source.train.labels == 3] = 4
    source.train.labels[np.flatnonzero(source.train.labels == 4)[:2]] = 3  # two examples of class 3 left
    with pytest.raises(ConfigError, match=r"trainer.cv_folds=3: class 3 has 2 training example\(s\)"):
        sources.folds(source, 3)


def test_three_fold_cv_runs_three_children_and_the_parent_logs_their_mean(workdir) -> None:
    cfg = compose_config([*TINY, "trainer.cv_folds=3", "tracking.log_model=false", "tracking.checkpoints=none"])
    result = train(cfg)
    client = MlflowClient(tracking_uri(workdir))
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["workbench.kind"] == "cv"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'", order_by=["tags.cv_fold"]
    )
    assert [c.data.tags["cv_fold"] for c in children] == ["1", "2", "3"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert [c.info.run_name for c in children] == [f"{parent.info.run_name}-fold-{i}" for i in (1, 2, 3)]
    values = [c.data.metrics["val_accuracy"] for c in children]
    assert parent.data.metrics["cv_val_accuracy_mean"] == pytest.approx(np.mean(values))
    assert parent.data.metrics["cv_val_accuracy_std"] == pytest.approx(np.std(values))
    assert result.metrics["val_accuracy"] == pytest.approx(np.mean(values))  # what run.py and a trial return
    history = client.get_metric_history(result.run_id, "fold_val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(i, v) for i, v in enumerate(values, 1)]


def test_a_cv_study_prunes_a_far_off_learning_rate_across_folds(workdir) -> None:
    # Five folds: the one-sided Wilcoxon test needs four paired folds, all worse, to reach p = 1/16 < 0.1.
    # The grid's seed puts a good learning rate before the far-off one (checked below).
    args = [
        f"study={STUDY}",
        "trainer.cv_folds=5",
        "study.pruner.name=wilcoxon",
        "study.sampler.name=grid",
        "study.sampler.seed=1",
        "study.n_trials=2",
        # A grid of two points: every parameter but the learning rate has one value.
        "++study.params={optimizer.learning_rate:{low:1.0e-9,high:0.01,log:false,step:0.009999999},"
        "trainer.batch_size:{choices:[16]},schedule.decay_factor:{step:1.0},model.dropout:{step:1.0}}",
        # One epoch of 30 steps a fold: enough for the good rate to beat the far-off one in every fold.
        "trainer.epochs=1",
        "trainer.steps_per_epoch=30",
        "trainer.batch_size=16",
        "model.input_size=16",
        "trainer.validation_steps=3",
        "tracking.log_model=false",
        "tracking.checkpoints=none",
    ]
    result = multirun(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    good, far_off = load_study(workdir).get_trials()
    rates = [good.params["optimizer.learning_rate"], far_off.params["optimizer.learning_rate"]]
    assert rates == [pytest.approx(0.01), pytest.approx(1e-9)], "the grid's order changed: pick another seed"
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [1, 2, 3, 4, 5]
    assert good.value == pytest.approx(np.mean(list(good.intermediate_values.values())))
    assert far_off.state == TrialState.PRUNED and sorted(far_off.intermediate_values) == [1, 2, 3, 4]
    client = MlflowClient(tracking_uri(workdir))
    run = client.get_run(far_off.user_attrs["mlflow_run_id"])
    assert run.data.tags["pruned_fold"] == "4" and run.info.run_name.endswith("(pruned at fold 4)")
    folds = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(folds) == 4, "the fifth fold was never trained"


def test_a_stopped_cv_run_resumes_without_training_finished_folds_again(workdir: Path) -> None:
    args = [*CV_ARGS, "trainer.cv_folds=3"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=workdir, env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        progress = list(workdir.glob("checkpoints/*/cv.json"))
        if progress and "1" in json.loads(progress[0].read_text())["folds"]:
            proc.send_signal(signal.SIGTERM)  # during fold 2
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, f"the run ended before it could be stopped:\n{out}"
    assert "continue with:" in out and "trainer.resume=true" in out, out[-2000:]

    resumed = run_cli([*args, "trainer.resume=true"], cwd=workdir, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client = MlflowClient(tracking_uri(workdir))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("workbench.kind") == "cv"]
    children = sorted((r for r in runs if r.data.tags.get("workbench.kind") == "cv_fold"), key=_fold)
    assert [_fold(c) for c in children] == [1, 2, 3], "each fold has one run, the stopped one continued"
    assert all(c.info.status == "FINISHED" for c in [parent, *children])
    for child in children:  # every epoch once: fold 1 was not trained again, fold 2 went on from its checkpoint
        assert metric_steps(client, child.info.run_id, "val_accuracy") == [1, 2, 3]
    assert metric_steps(client, parent.info.run_id, "fold_val_accuracy") == [1, 2, 3]


def _fold(run) -> int:
    return int(run.data.tags["cv_fold"])


def test_a_dead_workers_cv_trial_is_retried_without_training_finished_folds_again(workdir: Path) -> None:
    args = [f"study={STUDY}", "study.n_trials=1", "study.pruner.name=none", "trainer.cv_folds=3", *CV_ARGS]
    command = [sys.executable, str(ROOT / "run.py"), "--multirun", *args]
    process = subprocess.Popen(command, cwd=workdir, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    fold_2 = workdir / "checkpoints" / STUDY / "trial-0" / "fold-2" / "state.json"
    deadline = time.monotonic() + 300
    while not (fold_2.is_file() and json.loads(fold_2.read_text())["epoch"] >= 1):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "fold 2 did not reach its first checkpoint in 300 s"
        time.sleep(0.02)
    process.kill()  # after fold 2's first epoch: no Python code runs, the trial and its runs stay RUNNING
    process.wait()
    checkpointed = json.loads(fold_2.read_text())["epoch"]
    assert checkpointed < 3, "killed too late: fold 2 had trained all its epochs"

    result = multirun(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    dead, retry = load_study(workdir).get_trials()
    assert (dead.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert sorted(retry.intermediate_values) == [1, 2, 3]
    client = MlflowClient(tracking_uri(workdir))
    assert client.get_run(dead.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`workbench.kind` = 'cv_fold'"
    )
    by_fold = {fold: [r for r in runs if _fold(r) == fold] for fold in (1, 2, 3)}
    assert [len(by_fold[fold]) for fold in (1, 2, 3)] == [1, 2, 1], "fold 1 trained once; fold 2 went on in a new run"
    killed, went_on = sorted(by_fold[2], key=lambda r: r.info.status != "KILLED")
    assert (killed.info.status, went_on.info.status) == ("KILLED", "FINISHED")
    assert metric_steps(client, went_on.info.run_id, "val_accuracy") == list(range(checkpointed + 1, 4))
    assert metric_steps(client, by_fold[1][0].info.run_id, "val_accuracy") == [1, 2, 3]
    retry_run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert metric_steps(client, retry_run.info.run_id, "fold_val_accuracy") == [1, 2, 3]
