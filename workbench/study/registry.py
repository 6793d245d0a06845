"""A study's winner in the MLflow Model Registry: a version of a registered model, with the alias `champion`.

`workbench study best NAME --register MODEL` does it, and so does the sweeper when a study with
`study.register: MODEL` ends FINISHED. A trial's run logs its final model as an MLflow 3 LoggedModel (one of
the run's outputs); `mlflow.register_model("models:/<model id>", MODEL)` makes it a version whose source is
that URI and whose run is the trial's. Registering the same model again finds that version by its source and
only moves the alias, so a rerun or a restarted study adds no duplicate. Registry aliases, not the
deprecated stages. `model.weights=models:/MODEL@champion` fine-tunes from it.

MLflow loads only inside the functions: the study spec checks names with `check_name` before anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workbench.config import ConfigError

if TYPE_CHECKING:
    import optuna
    from mlflow.tracking import MlflowClient
    from omegaconf import DictConfig
    from optuna.trial import FrozenTrial

    from workbench.study.spec import Spec

ALIAS = "champion"
# Stricter than MLflow (which refuses only '/' and ':'): the name goes unquoted into models:/NAME@champion,
# a Hydra override and a search filter.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,255}")


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    trial: int
    reused: bool  # the trial's model had this version already; only the alias moved

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{ALIAS}"

    def lines(self, spec: Spec, values: str) -> list[str]:
        """What the commands print: the version and the URI that fine-tunes from it."""
        again = " (already registered: no new version)" if self.reused else ""
        return [
            f"Registered trial {self.trial} of study {spec.name} ({values}) as {self.name} version "
            f"{self.version}, alias {ALIAS}{again}",
            self.uri,
        ]


def check_name(where: str, name: str) -> None:
    """Refuse a registered model name that would not survive `models:/NAME@champion` unquoted."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: a registered model name is letters, digits, '.', '_' and '-', starting with a letter "
            "or digit, at most 256 characters"
        )


def check_study(spec: Spec, cfg: DictConfig) -> None:
    """`study.register`, before any trial: a name, one best trial, and trials that log and keep a model."""
    if spec.register is None:
        return
    where = f"study.register={spec.register}"
    check_name(where, spec.register)
    if spec.multi_objective:
        raise ConfigError(
            f"{where}: a multi-objective study has a Pareto front, not one best trial; once it ends, register "
            f"one with: workbench study best {spec.name} --trial N --register {spec.register}"
        )
    if spec.keep is not None and spec.keep.models == 0:
        raise ConfigError(f"{where}: study.keep.models=0 deletes every trial's model; keep at least 1")
    if not cfg.tracking.log_model:
        raise ConfigError(f"{where}: tracking.log_model is false, so the trials log no model to register")
    if cfg.trainer.cv_folds:
        raise ConfigError(
            f"{where}: a cross-validated trial logs its folds' models, not one; retrain the best with "
            f"`workbench study best {spec.name}` and register that"
        )


def trial_to_register(study: optuna.Study, spec: Spec, number: int | None) -> FrozenTrial:
    """The best trial, or trial `number`, which must be complete; ConfigError says why not."""
    from optuna.trial import TrialState

    from workbench.study import report

    if number is None:
        best = report.best_trials(study, spec)
        if not best:
            raise ConfigError(f"study {spec.name} has no complete trial yet")
        if spec.multi_objective:
            numbers = ", ".join(str(t.number) for t in best)
            raise ConfigError(
                f"study {spec.name} is multi-objective: choose one of its Pareto trials ({numbers}) with --trial N"
            )
        return best[0]
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not found:
        raise ConfigError(f"--trial {number}: study {spec.name} has no such trial")
    if found[0].state != TrialState.COMPLETE:
        raise ConfigError(
            f"--trial {number}: trial {number} of study {spec.name} is {found[0].state.name}; only a complete "
            "trial is registered"
        )
    return found[0]


def register(trial: FrozenTrial, spec: Spec, name: str) -> Registered:
    """Make the trial's logged model a version of `name` in MLflow's current store (a new version, or the
    one that holds it already), tag it, and point the alias `champion` at it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id, model_id = _logged_model(client, trial, spec)
    source = f"models:/{model_id}"
    tags = version_tags(trial, spec)
    # The registry does not keep a version's model id; its source is the URI it was registered from.
    held = [v for v in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'") if v.source == source]
    if held:
        version = str(min(int(v.version) for v in held))
        for key, value in tags.items():  # a version registered by hand gets them too
            client.set_model_version_tag(name, version, key, value)
    else:
        version = str(mlflow.register_model(source, name, tags=tags).version)
    client.set_registered_model_alias(name, ALIAS, version)
    return Registered(name, version, trial.number, reused=bool(held))


def version_tags(trial: FrozenTrial, spec: Spec) -> dict[str, str]:
    """Where the version comes from and how to train it again (secrets hidden, as in the retrain command)."""
    from workbench.config import redact
    from workbench.study import report

    return {
        "study": spec.name,
        "study_storage": redact(spec.storage),
        "trial_number": str(trial.number),
        "metric": ",".join(spec.metrics),
        "value": ",".join(repr(v) for v in trial.values),
        "retrain_command": report.retrain_command(trial, spec),
    }


def _logged_model(client: MlflowClient, trial: FrozenTrial, spec: Spec) -> tuple[str, str]:
    """The trial's run id and the id of the model it logged last; ConfigError when there is none left."""
    import mlflow
    from mlflow.entities.logged_model_status import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    from workbench.config import redact
    from workbench.study.keep import DELETED_TAG

    where = f"trial {trial.number} of study {spec.name}"
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        raise ConfigError(f"{where} has no MLflow run")
    try:
        run = client.get_run(run_id)
    except MlflowException:
        store = redact(mlflow.get_tracking_uri())
        raise ConfigError(f"{where}: no run {run_id} in {store}; give --tracking-uri or MLFLOW_TRACKING_URI") from None
    outputs = sorted(run.outputs.model_outputs if run.outputs else [], key=lambda o: o.step)
    for output in reversed(outputs):  # the last one logged first
        try:
            model = client.get_logged_model(output.model_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # deleted
                continue
            raise
        if model.status == LoggedModelStatus.READY:
            return run_id, model.model_id
    if "model" in run.data.tags.get(DELETED_TAG, "").split(","):
        why = f"study.keep deleted it (run {run_id} is tagged {DELETED_TAG})"
    else:
        why = f"run {run_id} logged none (tracking.log_model=false?)"
    raise ConfigError(
        f"{where} has no logged model to register: {why}; retrain it with `workbench study best {spec.name} "
        f"--trial {trial.number}`"
    )
