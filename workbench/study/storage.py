"""The Optuna storage: `study.storage`, a SQLite file or a PostgreSQL database (any SQLAlchemy URL)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.config import ConfigError, redact, sqlalchemy_url

if TYPE_CHECKING:
    import optuna

    from workbench.study.spec import Spec

SQLITE_TIMEOUT_S = 60  # several workers and their heartbeats write to one file: wait for the lock, don't fail


def open_storage(spec: Spec, heartbeat: bool = False) -> optuna.storages.RDBStorage:
    """The study's RDB storage, its tables created if new. Workers pass heartbeat=True: a trial whose
    worker stops beating for `grace_period` seconds is failed and retried (up to `max_retry` times)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite_file(spec.storage) else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        options = {}
        if heartbeat:
            # The retry inherits the reported epochs: it goes on from the dead attempt's checkpoint.
            retry = RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry, inherit_intermediate_values=True)
            options = dict(
                heartbeat_interval=spec.heartbeat_interval,
                grace_period=spec.grace_period,
                heartbeat_stale_trial_callback=retry,
            )
        try:
            return RDBStorage(sqlalchemy_url(spec.storage), engine_kwargs=engine, **options)
        except Exception as exc:  # a driver missing, a server down, a bad URL
            reason = redact(str(exc).strip().splitlines()[0])
            raise ConfigError(f"study.storage={redact(spec.storage)}: cannot open it: {reason}") from exc


def create_study(spec: Spec) -> optuna.Study:
    """Create the study, or load it when it exists; refuse one optimised in other directions."""
    import optuna

    study = optuna.create_study(
        study_name=spec.name,
        storage=open_storage(spec, heartbeat=True),  # so fail_stale_trials finds the trials of dead workers
        directions=list(spec.directions),
        load_if_exists=True,
    )
    stored = [d.name.lower() for d in study.directions]
    if stored != list(spec.directions):
        raise ConfigError(
            f"study.direction={list(spec.directions)}: study {spec.name} in {redact(spec.storage)} was created "
            f"with {stored}; set study.name to start a new study"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(spec.metrics))  # for `workbench study` and optuna-dashboard
    study.set_user_attr("n_trials", spec.budget)  # this launch's budget, for `workbench study status`
    return study


def load_study(spec: Spec) -> tuple[Spec, optuna.Study]:
    """An existing study, with the spec as it was last launched: its metrics and budget may have come
    from the command line rather than the study file."""
    import dataclasses

    import optuna

    try:
        study = optuna.load_study(study_name=spec.name, storage=open_storage(spec))
    except KeyError:
        raise ConfigError(f"no study {spec.name} in {redact(spec.storage)}") from None
    launched = dataclasses.replace(
        spec,
        metrics=tuple(study.metric_names or spec.metrics),
        directions=tuple(d.name.lower() for d in study.directions),
        n_trials=study.user_attrs.get("n_trials", spec.n_trials),
    )
    return launched, study


def fail_stale_trials(study: optuna.Study) -> None:
    """A dead worker's trial stays RUNNING until its heartbeat is found stale: fail it (the retry callback
    queues it again) before counting the budget, or it would hold budget that no one spends."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases."""
    from sqlalchemy.engine import make_url

    return Path(make_url(url).database) if url.startswith("sqlite:") else None
