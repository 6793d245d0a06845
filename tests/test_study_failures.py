"""Studies whose trials fail (an exception, a diverging loss) and a multi-objective study."""

from __future__ import annotations

from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import (
    SMALL,
    STUDY,
    load_study,
    multirun,
    tracking_uri,
    workbench_cli,
)


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


# --- failures and multi-objective -------------------------------------------------------------------


def test_a_trial_that_raises_does_not_stop_the_study(workdir: Path) -> None:
    # A batch larger than the 1,437 training images makes the trainer raise for half the draws.
    args = [
        f"study={STUDY}",
        "study.n_trials=2",
        "study.params={trainer.batch_size:{choices:[16,4096]}}",
        "trainer.epochs=2",
        *SMALL,
    ]
    result = multirun(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load_study(workdir).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2 and failed
    for trial in failed:
        assert trial.params["trainer.batch_size"] == 4096
        assert "larger than the 1437 training images" in trial.user_attrs["error"]


def test_diverging_trials_fail_with_the_reason_and_stop_the_study(workdir: Path) -> None:
    args = [
        f"study={STUDY}",
        "study.n_trials=3",
        "study.max_failures=2",
        "trainer.epochs=2",
        *SMALL,
        "study.params={optimizer.learning_rate:{low:1.0e+20,high:1.0e+30}}",  # the loss goes NaN
    ]
    result = multirun(args, workdir)
    assert result.returncode == 1
    assert "error: study lr_batch_decay_dropout stopped: 2 trials failed (study.max_failures)" in result.stderr
    study = load_study(workdir)
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
        f"study={name}",
        "study.n_trials=2",
        "study.params={model:{choices:[small_cnn,mobilenet_v2]}}",
        "trainer.epochs=1",
        *SMALL,
        "model.input_size=32",
    ]
    result = multirun(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(workdir, name)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert {t.params["model"] for t in trials} == {"small_cnn", "mobilenet_v2"}
    front = study.best_trials
    # The front is exactly the trials no other trial beats on both accuracy and size.
    assert {t.number for t in front} == {t.number for t in trials if not any(_dominates(o, t) for o in trials)}
    status = workbench_cli(["study", "status", name], workdir)
    assert status.returncode == 0, status.stderr
    for output in (result.stdout, status.stdout):
        assert f"Pareto front ({len(front)} trials):" in output
        for trial in front:
            accuracy, parameters = trial.values
            assert f"trial {trial.number}: val_accuracy={accuracy:.6g}  parameters={parameters:.6g}" in output
    commands = workbench_cli(["study", "best", name], workdir).stdout
    assert commands.count("python run.py ") == len(front)


def _dominates(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    """a is no worse on both objectives (accuracy up, size down) and better on one."""
    (acc_a, size_a), (acc_b, size_b) = a.values, b.values
    return acc_a >= acc_b and size_a <= size_b and (acc_a, size_a) != (acc_b, size_b)
