"""Studies whose trials fail, each by its cause (invalid, out of memory, diverged), and a multi-objective study."""

from __future__ import annotations

import csv
import resource
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState

from helpers import (
    SMALL,
    STUDY,
    load_study,
    multirun,
    run_cli,
    tracking_uri,
    workbench_cli,
)
from workbench.config import ConfigError
from workbench.study import causes


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


# --- failures and multi-objective -------------------------------------------------------------------


def test_a_trial_whose_parameters_make_no_valid_config_fails_as_invalid_without_counting(workdir: Path) -> None:
    # A batch larger than the 1,437 training images is refused for half the draws: `invalid`, which does
    # not count toward max_failures, so one allowed failure does not stop the study.
    args = [
        f"study={STUDY}",
        "study.n_trials=2",
        "study.max_failures=1",
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
        assert trial.params["trainer.batch_size"] == 4096 and trial.user_attrs["failure"] == "invalid"
        assert "larger than the 1437 training images" in trial.user_attrs["error"]
    status = workbench_cli(["study", "status", STUDY], workdir)
    assert f"failed       {len(failed)}  (invalid {len(failed)})" in status.stdout, status.stdout


def test_an_out_of_memory_trial_fails_as_oom_is_not_retried_and_the_study_goes_on(workdir: Path) -> None:
    # Under an 8 GiB address-space limit, 200,000 synthetic 128-pixel images (9.8 GB) cannot be held.
    args = [
        f"study={STUDY}",
        "study.n_trials=2",
        "study.sampler.name=grid",
        "study.pruner.name=none",
        "data=synthetic",
        # A grid of two points: every parameter but the number of images has one value.
        "++study.params={data.num_examples:{type:categorical,choices:[64,200000]},optimizer.learning_rate:"
        "{low:0.001,high:0.01,log:false,step:1.0},trainer.batch_size:{choices:[16]},schedule.decay_factor:"
        "{step:1.0},model.dropout:{step:1.0}}",
        "trainer.epochs=1",
        *SMALL,
        "model.input_size=128",
    ]
    limit = 8 * 2**30
    result = run_cli(
        ["--multirun", *args], cwd=workdir, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load_study(workdir).get_trials()
    # The grid, exhausted with one point failed, asks for it again: a new trial, not a retry of the first.
    assert all(RetryFailedTrialCallback.retried_trial_number(t) is None for t in trials)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.params["data.num_examples"] == 200000 for t in failed)
    assert all(t.user_attrs["failure"] == "oom" and "MemoryError" in t.user_attrs["error"] for t in failed)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2, "the study goes on"
    status = workbench_cli(["study", "status", STUDY], workdir)
    assert f"failed       {len(failed)}  (oom {len(failed)})" in status.stdout, status.stdout


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        (KeyboardInterrupt(), "preempted"),
        (MemoryError(), "oom"),
        (RuntimeError("CUDA_ERROR_OUT_OF_MEMORY: out of memory"), "oom"),
        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes."), "oom"),
        (FloatingPointError("x"), "error"),
        (ConfigError("model.input_size=31: must be at least 32"), "invalid"),
        (ValueError("something else"), "error"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v,
)
def test_each_exception_has_its_cause(exc: BaseException, cause: str) -> None:
    assert causes.of(exc) == cause


def test_tensorflows_own_errors_have_their_causes() -> None:
    import tensorflow as tf

    from workbench.callbacks import Diverged

    exhausted = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,1024]")
    assert causes.of(exhausted) == "oom"
    assert causes.of(Diverged("training loss became nan in epoch 1")) == "diverged"
    try:
        try:
            raise exhausted
        except tf.errors.ResourceExhaustedError as inner:
            raise RuntimeError("the fit failed") from inner
    except RuntimeError as outer:
        assert causes.of(outer) == "oom", "the cause is found down the chain"


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
        assert trial.user_attrs["failure"] == "diverged"
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["state"] == "FAIL"
        assert run.data.tags["workbench.failure"] == "diverged"
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
    client = MlflowClient(tracking_uri(workdir))
    path = client.download_artifacts(study.user_attrs["mlflow_parent_run_id"], "pareto_front.csv", str(workdir))
    rows = list(csv.DictReader(Path(path).read_text().splitlines()))
    assert [(int(r["number"]), float(r["parameters"])) for r in rows] == [(t.number, t.values[1]) for t in front]


def _dominates(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> bool:
    """a is no worse on both objectives (accuracy up, size down) and better on one."""
    (acc_a, size_a), (acc_b, size_b) = a.values, b.values
    return acc_a >= acc_b and size_a <= size_b and (acc_a, size_a) != (acc_b, size_b)
