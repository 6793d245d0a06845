"""The study's artifact policy (`study.keep`): only the best trials keep their logged model and their
checkpoint artifacts; the others lose them, their params, metrics, curves and config stay.

Nothing is remembered between calls: the best trials come from Optuna's storage and what is already gone
from the run's tag `workbench.deleted`, so a restarted study, another worker or `workbench study gc`
compute the same. A trial that enters the top displaces one, which loses its artifacts at the next call
(each worker calls after each trial; the sweeper when the study ends).

MLflow 3 keeps a logged model as a LoggedModel with an artifact location of its own, outside the run's
artifacts. It is deleted as `mlflow gc` deletes one: its files through the artifact repository of that
location (a local folder, or `mlflow-artifacts:` through the tracking server), then the entity
(`delete_logged_model`, which only marks it deleted). A model with a version in the model registry is never
deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import optuna
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repo import ArtifactRepository
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from workbench.config import redact
from workbench.study.spec import Keep

log = logging.getLogger(__name__)

DELETED_TAG = "workbench.deleted"  # "checkpoints", "model" or "checkpoints,model"
ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class Deletion:
    trial: int
    run_id: str
    kind: str  # "model" or "checkpoints"
    bytes: int


def keepers(study: optuna.Study, trials: list[FrozenTrial], count: int | None) -> set[int] | None:
    """The numbers of the trials that keep an artifact kind: the best `count` complete trials by the
    study's direction, or (multi-objective) the Pareto front; None: every trial keeps it."""
    if count is None:
        return None
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if count == 0 or not complete:
        return set()
    if len(study.directions) > 1:
        return {t.number for t in study.best_trials}
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    ranked = sorted(complete, key=lambda t: (sign * cast(float, t.value), t.number))  # a tie: the earlier trial
    return {t.number for t in ranked[:count]}


def apply(study: optuna.Study, keep: Keep, dry_run: bool = False) -> list[Deletion]:
    """Delete (or with `dry_run`, list) the artifacts the policy does not keep, in the current tracking
    store. Trials still running are left alone."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in ENDED and t.user_attrs.get("mlflow_run_id")]
    kept = {"model": keepers(study, trials, keep.models), "checkpoints": keepers(study, trials, keep.checkpoints)}
    client = MlflowClient()
    deletions: list[Deletion] = []
    for trial in trials:
        kinds = [kind for kind, numbers in kept.items() if numbers is not None and trial.number not in numbers]
        if not kinds:
            continue
        try:
            for run in _runs(client, trial.user_attrs["mlflow_run_id"]):
                deletions += _delete(client, trial.number, run, kinds, dry_run)
        except (MlflowException, OSError) as exc:  # the next call tries again
            log.warning("Trial %d: its artifacts are not deleted yet: %s", trial.number, redact(str(exc)))
    return deletions


def _runs(client: MlflowClient, run_id: str) -> list[Run]:
    """The trial's run and, for a cross-validated trial, its folds' runs."""
    run = client.get_run(run_id)
    folds = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return [run, *folds]


def _delete(client: MlflowClient, number: int, run: Run, kinds: list[str], dry_run: bool) -> list[Deletion]:
    done = set(filter(None, run.data.tags.get(DELETED_TAG, "").split(",")))
    deletions: list[Deletion] = []
    for kind in kinds:
        if kind in done:
            continue
        size = _delete_checkpoints(run, dry_run) if kind == "checkpoints" else _delete_models(client, run, dry_run)
        if size is None:
            continue  # a registered model: kept
        deletions.append(Deletion(number, run.info.run_id, kind, size))
        done.add(kind)
    if deletions and not dry_run:
        client.set_tag(run.info.run_id, DELETED_TAG, ",".join(sorted(done)))
    return deletions


def _delete_checkpoints(run: Run, dry_run: bool) -> int:
    repo = get_artifact_repository(run.info.artifact_uri)
    size = _size(repo, "checkpoints")
    if size and not dry_run:
        repo.delete_artifacts("checkpoints")
    return size


def _delete_models(client: MlflowClient, run: Run, dry_run: bool) -> int | None:
    """The run's logged models' bytes, deleted unless `dry_run`; None when one has a registered version."""
    if client.search_model_versions(f"run_id = '{run.info.run_id}'"):
        return None
    size = 0
    model_ids = [output.model_id for output in (run.outputs.model_outputs if run.outputs else [])]
    for model_id in model_ids:
        try:
            model = client.get_logged_model(model_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue  # deleted already (by a call that stopped before tagging the run)
            raise
        repo = get_artifact_repository(model.artifact_location)
        size += _size(repo, None)
        if not dry_run:
            repo.delete_artifacts()
            client.delete_logged_model(model_id)
    return size


def _size(repo: ArtifactRepository, path: str | None) -> int:
    """Bytes under `path` of an artifact repository (0 when nothing is there)."""
    total = 0
    for info in repo.list_artifacts(path):
        total += _size(repo, info.path) if info.is_dir else (info.file_size or 0)
    return total
