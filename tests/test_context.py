"""A run logs its own context: a study trial's recipe tag and config artifacts are the trial's, not its
worker job's; the retrain command `workbench study best` prints names and tags the run it starts."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import TINY, cli_env, run_cli, tracking_uri

STUDY = "lr_batch_decay_dropout"
# The recipe sits in the study's base overrides, as in studies/nasnet_large_momentum.yaml; the rest keeps the
# trial tiny (a recipe's own epochs and batch size are overridden after it, as a user would).
BASE = "['recipe=resnet50_imagenet','model=small_cnn','schedule=exponential','augmentation=none']"
QUIET = [*TINY, "trainer.validation_steps=2", "tracking.log_model=false", "tracking.checkpoints=none"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, optuna.trial.FrozenTrial]:
    """One trial of a study whose base overrides select a recipe, and that trial."""
    cwd = tmp_path_factory.mktemp("context")
    result = run_cli(
        [
            "--multirun",
            f"study={STUDY}",
            "study.n_trials=1",
            "study.pruner.name=none",
            f"study.base_overrides={BASE}",
            *QUIET,
        ],
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (trial,) = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{cwd / 'optuna.db'}").get_trials()
    return cwd, trial


def test_a_trial_logs_its_own_recipe_and_overrides(study) -> None:
    cwd, trial = study
    client = MlflowClient(tracking_uri(cwd))
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.run_name == f"trial-0-{STUDY}"  # the number first, where the UI's column cuts nothing
    assert run.data.tags["recipe"] == "resnet50_imagenet"
    assert run.data.params["optimizer.name"] == "nesterov"  # the recipe's optimizer did train

    overrides = trial.user_attrs["overrides"]
    assert "recipe=resnet50_imagenet" in overrides
    assert run.data.tags["overrides"] == " ".join(overrides)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    # The trial's overrides, not the worker job's (study=..., study.base_overrides=...); the worker's
    # hydra.yaml describes the worker, so the trial has none.
    assert artifacts == {"config/config.yaml", "config/overrides.yaml"}
    logged = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config/overrides.yaml")).read_text())
    assert logged == overrides
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config/config.yaml")).read_text())
    assert config["tracking"]["run_name"] == f"trial-0-{STUDY}" and config["optimizer"]["name"] == "nesterov"


def test_the_retrain_command_names_and_tags_its_run(study) -> None:
    cwd, trial = study
    best = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "study", "best", STUDY],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert best.returncode == 0, best.stderr
    command = shlex.split(best.stdout.strip())  # a shell command: the tags override is quoted
    assert command[:2] == ["python", "run.py"]

    retrain = run_cli(command[2:], cwd=cwd)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    run_id = retrain.stdout.split("\nRun ")[1].split()[0]
    run = MlflowClient(tracking_uri(cwd)).get_run(run_id)
    assert run.info.run_name == f"retrain-trial-{trial.number}-{STUDY}"
    assert run.data.tags["reproduces_study"] == STUDY
    assert run.data.tags["reproduces_trial"] == str(trial.number)
    assert run.data.tags["recipe"] == "resnet50_imagenet"  # `python run.py` tags its recipe as a trial does
    assert "mlflow.parentRunId" not in run.data.tags
