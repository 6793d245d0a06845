"""The study's winner in the MLflow Model Registry: `study.register` when a study ends and `workbench study
best --register`, on a SQLite store (test_keep.py registers through a real tracking server); then
fine-tuning from `models:/MODEL@champion`. Real studies of small_cnn on digits."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import h5py
import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import STUDY, load_study, multirun, run_cli, tracking_uri, workbench_cli
from workbench.config import ConfigError
from workbench.study import compose, preflight
from workbench.study.spec import Spec

MODEL = "digits-cnn"
SMALL = [
    "trainer.epochs=1",
    "trainer.steps_per_epoch=2",
    "trainer.batch_size=16",
    "model.input_size=16",
    "trainer.validation_steps=2",
    "tracking.checkpoints=none",
]
# val_loss, a continuous value: no ties between trials.
TRIALS = [
    f"study={STUDY}",
    "study.pruner.name=none",
    "study.metric=val_loss",
    "study.direction=minimize",
    *SMALL,
]


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Three trials, registered at the end; study.keep leaves the worst one without its model."""
    folder = tmp_path_factory.mktemp("registry")
    keep = "study.keep={models: 2, checkpoints: 0}"
    result = multirun([*TRIALS, "study.n_trials=3", keep, f"study.register={MODEL}"], folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, result.stdout


def model_id(client: MlflowClient, run_id: str) -> str:
    (output,) = client.get_run(run_id).outputs.model_outputs
    return output.model_id


def ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.value)


def test_the_best_trial_becomes_the_champion_when_the_study_ends(study_folder: tuple[Path, str]) -> None:
    folder, stdout = study_folder
    study, client = load_study(folder), MlflowClient(tracking_uri(folder))
    best = study.best_trial
    run_id = best.user_attrs["mlflow_run_id"]
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1" and version.run_id == run_id
    assert version.source == f"models:/{model_id(client, run_id)}"  # the trial's LoggedModel
    tags = version.tags
    assert (tags["study"], tags["trial_number"], tags["metric"]) == (STUDY, str(best.number), "val_loss")
    assert float(tags["value"]) == best.value and tags["study_storage"] == "sqlite:///optuna.db"
    retrain = workbench_cli(["study", "best", STUDY], folder)
    assert retrain.returncode == 0 and tags["retrain_command"] == retrain.stdout.strip()
    assert f"Registered trial {best.number} of study {STUDY} (val_loss=" in stdout
    assert f"as {MODEL} version 1, alias champion\nmodels:/{MODEL}@champion\n" in stdout


def test_registering_again_reuses_the_version_and_moves_the_alias(study_folder: tuple[Path, str]) -> None:
    folder, _ = study_folder
    study, client = load_study(folder), MlflowClient(tracking_uri(folder))
    best, second, worst = ranked(study)

    # The worst trial's model went to study.keep: one line, exit 2, nothing registered.
    gone = workbench_cli(["study", "best", STUDY, "--trial", str(worst.number), "--register", MODEL], folder)
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1, gone.stderr
    assert f"error: trial {worst.number} of study {STUDY} has no logged model to register: study.keep" in gone.stderr

    other = workbench_cli(["study", "best", STUDY, "--trial", str(second.number), "--register", MODEL], folder)
    assert other.returncode == 0, other.stderr
    assert f"as {MODEL} version 2, alias champion\nmodels:/{MODEL}@champion" in other.stdout
    assert client.get_model_version_by_alias(MODEL, "champion").run_id == second.user_attrs["mlflow_run_id"]

    again = workbench_cli(["study", "best", STUDY, "--register", MODEL], folder)
    assert again.returncode == 0, again.stderr
    assert (
        f"trial {best.number} of study {STUDY}" in again.stdout
        and "version 1, alias champion (already registered" in again.stdout
    )
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]


def test_bad_names_and_trials_are_refused_in_one_line(study_folder: tuple[Path, str], tmp_path: Path) -> None:
    folder, _ = study_folder
    client = MlflowClient(tracking_uri(folder))
    before = len(client.search_model_versions(f"name = '{MODEL}'"))
    for args, message in (
        (["--register", "bad/name"], "error: --register bad/name: a registered model name is letters, digits"),
        (["--register", MODEL, "--trial", "99"], f"error: --trial 99: study {STUDY} has no such trial"),
    ):
        result = workbench_cli(["study", "best", STUDY, *args], folder)
        assert result.returncode == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == before
    assert [m.name for m in client.search_registered_models()] == [MODEL]

    # At launch, before any storage, run or trial exists: one line and exit 2 as a user sees it, then the
    # other refusals from the same check in this process.
    result = multirun([*TRIALS, "study.n_trials=1", "study.register='a b'"], tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: study.register=a b: a registered model name is letters")
    assert list(tmp_path.iterdir()) == []
    for extra, message in (
        (["tracking.log_model=false"], "tracking.log_model is false, so the trials log no model to register"),
        (["study.keep={models: 0}"], "study.keep.models=0 deletes every trial's model; keep at least 1"),
        (["trainer.cv_folds=3"], "a cross-validated trial logs its folds' models, not one"),
        (
            ["study.metric=[val_loss,parameters]", "study.direction=[minimize,minimize]"],
            f"a multi-objective study has a Pareto front, not one best trial; once it ends, register one with: "
            f"workbench study best {STUDY} --trial N --register {MODEL}",
        ),
    ):
        overrides = [*TRIALS, f"study.register={MODEL}", *extra]
        spec = Spec.from_config(compose.compose(overrides).study, default_name=STUDY)
        with pytest.raises(ConfigError) as refused:
            preflight.preflight(spec, compose.user_overrides(overrides[1:]))
        assert str(refused.value).startswith(f"study.register={MODEL}: {message}")


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_multi_objective_study_needs_a_complete_trial_named(tmp_path: Path) -> None:
    """A real Optuna storage holding a two-objective study and its trials (their training is not the point)."""
    storage = f"sqlite:///{tmp_path / 'mo.db'}"
    study = optuna.create_study(study_name="mo", storage=storage, directions=["minimize", "minimize"])
    study.set_metric_names(["val_loss", "parameters"])
    for values in ([0.5, 300.0], [0.4, 400.0], [0.6, 500.0]):  # trials 0 and 1 make the front
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs={"overrides": []}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"overrides": []}))
    base = ["study", "best", STUDY, "study.name=mo", "--storage", storage, "--register", MODEL]
    result = workbench_cli(base, tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "error: study mo is multi-objective: choose one of its Pareto trials (0, 1) with --trial N" in result.stderr
    pruned = workbench_cli([*base, "--trial", "3"], tmp_path)
    assert (
        pruned.returncode == 2 and "error: --trial 3: trial 3 of study mo is PRUNED; only a complete" in pruned.stderr
    )


def _model_file(uri: str, folder: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder))) / "data" / "model.keras"


def _weights(keras_file: Path) -> dict[str, np.ndarray]:
    """Every variable of a .keras archive, by its path in model.weights.h5 (no TensorFlow needed)."""
    with zipfile.ZipFile(keras_file) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as h5:
        found: dict[str, np.ndarray] = {}
        h5.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return found


def test_fine_tuning_from_the_champion_starts_from_its_weights(study_folder: tuple[Path, str], tmp_path: Path) -> None:
    folder, _ = study_folder
    client = MlflowClient(tracking_uri(folder))
    champion = client.get_model_version_by_alias(MODEL, "champion")
    result = run_cli(
        [*SMALL, "model=small_cnn", f"model.weights=models:/{MODEL}@champion", "model.freeze=backbone"], folder
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split("\nRun ")[1].split()[0]
    assert client.get_run(run_id).data.params["model.weights"] == f"models:/{MODEL}@champion"

    mlflow.set_tracking_uri(tracking_uri(folder))  # for the downloads; conftest sets it back
    loaded = _weights(_model_file(f"models:/{MODEL}/{champion.version}", tmp_path / "champion"))
    tuned = _weights(_model_file(f"models:/{model_id(client, run_id)}", tmp_path / "tuned"))
    # Keras names the variables by class: layers/<the backbone model>/layers/<its layer>/vars/<i>, and the
    # head's layers/<layer>/vars/<i>.
    backbone = [k for k in loaded if k.count("layers/") == 2]
    classifier = [k for k in loaded if k.count("layers/") == 1]
    assert backbone and classifier and set(backbone + classifier) <= set(tuned)
    for key in backbone:  # frozen: exactly the champion's, which a fresh model would not be
        np.testing.assert_array_equal(tuned[key], loaded[key], err_msg=key)
    assert any(not np.array_equal(tuned[k], loaded[k]) for k in classifier)  # and the head trained on
