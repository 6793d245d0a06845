"""`study.keep`, the study's artifact policy, and `workbench study gc`: real studies on small_cnn and digits,
a local MLflow store and a real tracking server with an artifacts destination (where `study.register` is
tested too: test_registry.py covers it on a SQLite store)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from helpers import STUDY, TrackingServer, load_study, multirun, tracking_uri, workbench_cli

# SMALL (helpers.py) with models and checkpoints logged, one epoch, val_loss: ties are unlikely.
TRIALS = [
    f"study={STUDY}",
    "study.pruner.name=none",
    "study.metric=val_loss",
    "study.direction=minimize",
    "trainer.epochs=1",
    "trainer.steps_per_epoch=2",
    "trainer.batch_size=16",
    "model.input_size=16",
    "trainer.validation_steps=2",
]


def ranked(study: optuna.Study) -> list[int]:
    """The complete trials' numbers, best (lowest val_loss) first."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return [t.number for t in sorted(complete, key=lambda t: (t.value, t.number))]


def holdings(client: MlflowClient, study: optuna.Study, artifacts: Path) -> dict[int, tuple[bool, bool]]:
    """Trial number -> (files of its logged model, files of its checkpoints) left on disk in the artifact
    folder (`mlruns/`, or the server's artifacts destination)."""
    held = {}
    for trial in study.get_trials(deepcopy=False):
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        (output,) = run.outputs.model_outputs
        experiment = artifacts / run.info.experiment_id
        model = experiment / "models" / output.model_id
        checkpoints = experiment / run.info.run_id / "artifacts" / "checkpoints"
        held[trial.number] = (_has_files(model), _has_files(checkpoints))
    return held


def _has_files(folder: Path) -> bool:
    return any(p.is_file() for p in folder.rglob("*"))


def expected(study: optuna.Study, models: int, checkpoints: int) -> dict[int, tuple[bool, bool]]:
    best = ranked(study)
    return {t.number: (t.number in best[:models], t.number in best[:checkpoints]) for t in study.get_trials()}


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keep")
    result = multirun([*TRIALS, "study.n_trials=4", "study.keep={models: 2, checkpoints: 1}"], folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_only_the_best_trials_keep_their_models_and_checkpoints(study_folder: Path) -> None:
    study = load_study(study_folder)
    client = MlflowClient(tracking_uri(study_folder))
    assert len(ranked(study)) == 4
    assert holdings(client, study, study_folder / "mlruns") == expected(study, models=2, checkpoints=1)
    for number in ranked(study)[2:]:  # params, metrics, curves and config stay
        run = client.get_run(study.trials[number].user_attrs["mlflow_run_id"])
        assert "val_loss" in run.data.metrics and "optimizer.learning_rate" in run.data.params
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config", "training_curves.png"}
        assert run.data.tags["workbench.deleted"] == "checkpoints,model"


def test_a_restarted_study_recomputes_the_policy_from_its_stores(study_folder: Path) -> None:
    result = multirun([*TRIALS, "study.n_trials=7", "study.keep={models: 2, checkpoints: 1}"], study_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(study_folder)
    assert len(ranked(study)) == 7
    assert holdings(MlflowClient(tracking_uri(study_folder)), study, study_folder / "mlruns") == expected(study, 2, 1)


def test_gc_lists_then_deletes_what_a_stricter_policy_drops(study_folder: Path) -> None:
    study = load_study(study_folder)
    client = MlflowClient(tracking_uri(study_folder))
    before = holdings(client, study, study_folder / "mlruns")
    second = ranked(study)[1]
    dry = workbench_cli(["study", "gc", STUDY, "--keep-models", "1", "--dry-run"], study_folder)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].startswith(f"trial {second}: would delete model of run ") and len(lines) == 2, dry.stdout
    assert "would free 1." in lines[-1] and " MB" in lines[-1]
    assert holdings(client, study, study_folder / "mlruns") == before, "a dry run deletes nothing"
    done = workbench_cli(["study", "gc", STUDY, "--keep-models", "1"], study_folder)
    assert done.returncode == 0, done.stderr
    assert f"trial {second}: deleted model" in done.stdout and "freed" in done.stdout
    assert holdings(client, study, study_folder / "mlruns") == expected(study, models=1, checkpoints=1)
    again = workbench_cli(["study", "gc", STUDY, "--keep-models", "1"], study_folder)
    assert again.stdout.splitlines() == [again.stdout.splitlines()[-1]] and "freed 0 KB" in again.stdout


def test_through_a_tracking_server_the_files_leave_its_artifacts_destination_and_the_winner_is_registered(
    workdir: Path, mlflow_server: TrackingServer
) -> None:
    """One study on a server for both: the policy deletes there, and study.register registers there (its
    model, the one study.keep leaves, is what fine-tuning downloads)."""
    from workbench.tracking import local_weights

    server, name = [f"tracking.uri={mlflow_server.url}", "tracking.experiment=keep-server"], "served-cnn"
    launch = [*TRIALS, *server, "study.n_trials=3", "study.keep={models: 1, checkpoints: 0}", f"study.register={name}"]
    result = multirun(launch, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    study, client = load_study(workdir), MlflowClient(mlflow_server.url)
    held = holdings(client, study, mlflow_server.artifacts)
    assert held == expected(study, models=1, checkpoints=0)
    assert sum(model for model, _ in held.values()) == 1

    version = client.get_model_version_by_alias(name, "champion")
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    (output,) = client.get_run(best_run).outputs.model_outputs
    assert version.run_id == best_run and version.source == f"models:/{output.model_id}"
    assert version.tags["trial_number"] == str(study.best_trial.number)
    again = workbench_cli(["study", "best", STUDY, "--register", name, "--tracking-uri", mlflow_server.url], workdir)
    assert again.returncode == 0 and "version 1, alias champion (already registered" in again.stdout, again.stderr
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    # The fine-tuning path's download, through the server, gives the trial's own file in its artifacts folder.
    (stored,) = [p for p in mlflow_server.artifacts.rglob("model.keras") if output.model_id in p.parts]
    mlflow.set_tracking_uri(mlflow_server.url)  # as the trainer sets it; conftest sets it back
    with local_weights(OmegaConf.create({"name": "small_cnn", "weights": f"models:/{name}@champion"})) as cfg:
        assert Path(cfg.weights).read_bytes() == stored.read_bytes()


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ("study.keep={models: -1}", "error: study.keep.models=-1: a number of trials, 0 or more, or null for all"),
        ("study.keep=3", "error: study.keep=3: give {models: K, checkpoints: K} (or null to keep everything)"),
    ],
    ids=["negative", "not-a-mapping"],
)
def test_a_bad_policy_is_refused_before_any_trial(workdir: Path, keep: str, message: str) -> None:
    result = multirun([*TRIALS, "study.n_trials=1", keep], workdir)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert not (workdir / "optuna.db").exists()
