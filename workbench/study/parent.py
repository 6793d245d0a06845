"""The study's MLflow parent run, driven with MlflowClient and an explicit run id: the launching process
may also run a worker (the basic launcher), whose trainer uses MLflow's active-run API for the trials.

The run id is a study user attribute, so rerunning a study re-opens the same parent run, and it travels to
the workers (`study.parent_run_id`), which may be on other machines.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from workbench.config import flatten
from workbench.study import tally
from workbench.study.spec import Spec

RUN_ID_ATTR = "mlflow_parent_run_id"


def open_run(study: optuna.Study, spec: Spec, experiment: str, study_file: str | None) -> str:
    """Create the parent run, or re-open it when the study was launched before; return its id."""
    client = MlflowClient()
    run_id = study.user_attrs.get(RUN_ID_ATTR)
    if run_id and _exists(client, run_id):
        client.update_run(run_id, status="RUNNING")
        return run_id
    found = client.get_experiment_by_name(experiment)
    if found is None:  # tracking.configure created it before the study opened
        raise RuntimeError(f"MLflow experiment {experiment!r} does not exist")
    experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=f"study-{spec.name}", tags={"study": spec.name})
    params = [Param(k, v) for k, v in study_params(spec, study_file).items()]
    client.log_batch(run.info.run_id, params=params)
    study.set_user_attr(RUN_ID_ATTR, run.info.run_id)
    return run.info.run_id


def study_params(spec: Spec, study_file: str | None) -> dict[str, str]:
    """What defines the study, as MLflow params (secrets hidden)."""
    described = {
        "study_file": f"studies/{study_file}.yaml" if study_file else "none",
        "metric": ",".join(spec.metrics),
        "direction": ",".join(spec.directions),
        "n_trials": spec.n_trials,
        "timeout": spec.timeout,
        "workers": spec.workers,
        "storage": spec.storage,
        "base_overrides": " ".join(spec.base_overrides),
        "sampler": spec.sampler,
        "pruner": spec.pruner,
        "space": {p.key: p.describe() for p in spec.params},
    }
    return {k: v[:6000] for k, v in flatten(described).items()}  # flatten hides secrets


def log_progress(run_id: str, spec: Spec, study: optuna.Study) -> None:
    """Metrics over time (trials complete, pruned and failed; the best value so far; each parameter's
    importance, `importance.<param>`) and the table of trials so far, `trials.csv` (with the Pareto front,
    `pareto_front.csv`, for a multi-objective study)."""
    from workbench.study import report

    trials = study.get_trials(deepcopy=False)
    counts = tally.count(trials)
    metrics: dict[str, float] = {
        "trials_complete": counts.complete,
        "trials_pruned": counts.pruned,
        "trials_failed": counts.failed,
    }
    best = tally.best(spec, trials)
    if best is not None:
        metrics[f"best_{spec.metrics[0]}"] = best.values[0]
    metrics |= {f"importance.{param}": value for param, value in report.importances(study, spec).items()}
    step = counts.finished + counts.failed
    now = int(time.time() * 1000)
    client = MlflowClient()
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
    client.log_text(run_id, report.trials_csv(spec, trials), "trials.csv")
    if spec.multi_objective and best is not None:
        client.log_text(run_id, report.trials_csv(spec, report.best_trials(study, spec)), "pareto_front.csv")


def finish(run_id: str, status: str, artifacts: Path | None = None) -> None:
    """Upload the study's artifacts and end the run FINISHED, FAILED or KILLED."""
    client = MlflowClient()
    if artifacts is not None:
        client.log_artifacts(run_id, str(artifacts))
    client.set_terminated(run_id, status)


def _exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False
