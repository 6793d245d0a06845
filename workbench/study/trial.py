"""One trial: its config composed through Hydra, trained by the shared trainer, reported every epoch.

The MLflow child run, named `trial-<n>-<study>` (`... (pruned at epoch <e>)` once pruned), gets the tags
`study`, `trial_number`, `state` (RUNNING, then COMPLETE, PRUNED or FAIL), `pruned_epoch` and, with a FAIL,
`workbench.failure` (causes.py); the Optuna trial gets the user attributes `mlflow_run_id` and `overrides`
(what `workbench study best` prints), and `error` and `failure` when it failed.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from optuna.storages import RetryHeartbeatStaleTrialCallback

from workbench.config import redact
from workbench.study import causes, compose, storage

if TYPE_CHECKING:
    from workbench.study.lock import Lock
    from workbench.study.spec import Spec
    from workbench.train import RunContext

log = logging.getLogger(__name__)


def checkpoint_dir(study_name: str, number: int) -> Path:
    """A trial's local epoch checkpoint, found again by number when the trial is retried."""
    return Path("checkpoints") / study_name / f"trial-{number}"


class Objective:
    """What `study.optimize` calls for each trial of a worker."""

    def __init__(self, spec: Spec, user: list[str], parent_run_id: str, launch_id: str, lock: Lock):
        self.spec, self.user, self.parent_run_id, self.launch_id, self.lock = spec, user, parent_run_id, launch_id, lock
        self.running: int | None = None  # the number of the trial in progress

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        # The trial now exists as RUNNING, so the budget counts it: other workers may ask for theirs.
        # Holding the lock from the budget check to here keeps the trial count exact with parallel
        # workers (Optuna's MaxTrialsCallback only checks after a trial ends, so workers overshoot).
        # This worker first: a retry inherits the dead worker's, which storage.fail_stale_trials (run under
        # the lock) would take for this trial's.
        trial.set_user_attr("worker", storage.worker_identity())
        self.lock.release()
        trial.set_user_attr("launch_id", self.launch_id)
        self.running = trial.number
        directory = checkpoint_dir(self.spec.name, trial.number)
        try:
            result = self._run(trial, directory)
        except optuna.TrialPruned:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        except BaseException as exc:
            trial.set_user_attr("error", redact(f"{type(exc).__name__}: {exc}")[:1000])
            trial.set_user_attr("failure", causes.of(exc))
            if not isinstance(exc, KeyboardInterrupt):  # a stopped trial goes back to the study: keep it
                shutil.rmtree(directory, ignore_errors=True)
            raise
        # Only the retry of a trial whose worker died or was stopped needs the checkpoint.
        shutil.rmtree(directory, ignore_errors=True)
        return result

    def _run(self, trial: optuna.Trial, directory: Path) -> float | tuple[float, ...]:
        params = {param.key: param.suggest(trial) for param in self.spec.params}
        overrides = compose.trial_overrides(self.spec.base_overrides, self.user, params)
        trial.set_user_attr("overrides", [redact(o) for o in overrides])  # what `workbench study best` prints
        attempts = _dead_attempts(trial)
        cfg, context = compose.compose_run(
            overrides,
            [
                compose.assign("trainer.checkpoint_dir", str(directory)),
                compose.assign("trainer.resume", bool(attempts)),  # from scratch when no checkpoint is found
                # The number first: the MLflow UI's run-name column cuts long names short.
                compose.assign("tracking.run_name", f"trial-{trial.number}-{self.spec.name}"),
            ],
        )
        tags = {"study": self.spec.name, "trial_number": str(trial.number), "state": "RUNNING"}
        if attempts:
            tags["retry_of"] = str(attempts[0])
            _end_dead_run(trial, directory)
            trial.set_user_attr("failure", None)  # the dead attempt's, inherited with its other attributes
            _take_over_checkpoint(trial.number, attempts, self.spec.name, directory, cfg.trainer.epochs)
        return self._train(trial, cfg, context, tags)

    def _train(
        self, trial: optuna.Trial, cfg: DictConfig, context: RunContext, tags: dict[str, str]
    ) -> float | tuple[float, ...]:
        from workbench.train import train

        # Epochs are the steps a trial reports; with cross-validation, folds (what WilcoxonPruner compares).
        unit, steps = ("fold", cfg.trainer.cv_folds) if cfg.trainer.cv_folds else ("epoch", cfg.trainer.epochs)
        reporter = Reporter(trial, None if self.spec.multi_objective else self.spec.metrics[0], steps)
        started: list[str] = []

        def on_run_start(run_id: str) -> None:
            started.append(run_id)
            trial.set_user_attr("mlflow_run_id", run_id)  # at once, so a retry finds the run if the worker dies

        try:
            result = train(
                cfg, context, report=reporter, parent_run_id=self.parent_run_id, tags=tags, on_run_start=on_run_start
            )
        except BaseException as exc:
            if started:
                _finish(started[0], "FAIL", causes.of(exc))
            raise
        if reporter.pruned_step is not None:
            _finish(result.run_id, "PRUNED")
            _name_pruned(result.run_id, cfg.tracking.run_name, unit, reporter.pruned_step)
            raise optuna.TrialPruned(f"pruned after {unit} {reporter.pruned_step}")
        _finish(result.run_id, "COMPLETE")
        values = tuple(float(result.metrics[m]) for m in self.spec.metrics)
        return values if self.spec.multi_objective else values[0]


class Reporter:
    """The trainer's report hook: reports the metric to the trial after each step (an epoch, or a fold of a
    cross-validation) and stops it when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str | None, steps: int):
        self.trial, self.metric, self.steps = trial, metric, steps
        self.pruned_step: int | None = None

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        if self.metric is None or self.metric not in metrics:
            return False
        self.trial.report(metrics[self.metric], step)
        # After the last step there is nothing left to save: the trial completes, its value counts.
        if step < self.steps and self.trial.should_prune():
            self.pruned_step = step
            return True
        return False


def _dead_attempts(trial: optuna.Trial) -> list[int]:
    """The numbers of the earlier attempts at this trial whose workers died, oldest first."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retry_history(frozen)


def _end_dead_run(trial: optuna.Trial, directory: Path) -> None:
    """The dead worker never ended its MLflow run, whose id the retry inherited: mark it KILLED, through
    its outbox (beside `directory`), after whatever the dead worker left unsent there."""
    import mlflow

    from workbench.outbox import end_abandoned

    run_id = trial.user_attrs.get("mlflow_run_id")
    why = f"worker died; retried as trial {trial.number}"
    tags = {"state": "FAIL", "workbench.stopped": why, "workbench.failure": trial.user_attrs.get("failure") or "lost"}
    if run_id and not end_abandoned(directory.parent, run_id, mlflow.get_tracking_uri(), tags):
        # Its worker holds it: alive after all, only late with its heartbeat; it ends its run.
        log.warning("Trial %d: its earlier attempt's run %s is still in use, left to it", trial.number, run_id)


def _take_over_checkpoint(number: int, attempts: list[int], study_name: str, directory: Path, epochs: int) -> None:
    """Move the latest dead attempt's epoch checkpoint here, for the trainer to go on from."""
    import mlflow

    from workbench import cv
    from workbench.checkpoints import CheckpointDir

    for attempt in reversed(attempts):
        source = CheckpointDir(checkpoint_dir(study_name, attempt))
        if cv.is_cv_folder(source.path):
            why = f"worker died; retried as trial {number}"
            done = cv.take_over(source.path, directory, mlflow.get_tracking_uri(), why)
            log.info("Trial %d continues trial %d after %d folds", number, attempt, done)
            return
        if not source.exists():
            continue
        state = source.read_state()
        if state.epoch >= epochs:
            # Nothing left to train, so a new run would have no metrics to report: train again.
            log.info("Trial %d trains again: trial %d had finished its epochs", number, attempt)
        else:
            shutil.copytree(source.path, directory, dirs_exist_ok=True)
            state.run_id = None  # a new child run for this trial; training goes on from state.epoch
            CheckpointDir(directory).write_state(state)
            log.info("Trial %d continues trial %d after epoch %d", number, attempt, state.epoch)
        shutil.rmtree(source.path)
        return


def _finish(run_id: str, state: str, failure: str | None = None) -> None:
    """Tag the trial's run with its final state (and with a FAIL, its cause)."""
    client = MlflowClient()
    client.set_tag(run_id, "state", state)
    if failure is not None:
        client.set_tag(run_id, "workbench.failure", failure)


def _name_pruned(run_id: str, run_name: str, unit: str, step: int) -> None:
    """A pruned trial's run ends FINISHED, as a complete one's does: its name, which the runs table always
    shows, says it was pruned (`trial-3-<study> (pruned at epoch 2)`; `... (pruned at fold 4)`)."""
    client = MlflowClient()
    client.set_tag(run_id, f"pruned_{unit}", str(step))
    client.set_tag(run_id, "mlflow.runName", f"{run_name} (pruned at {unit} {step})")
