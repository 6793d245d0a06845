"""The Optuna storage: `study.storage`, a SQLite file or a PostgreSQL database (any SQLAlchemy URL)."""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from workbench.config import ConfigError, first_line, redact, sqlalchemy_url

if TYPE_CHECKING:
    import optuna

    from workbench.study.spec import Spec

log = logging.getLogger(__name__)
SQLITE_TIMEOUT_S = 60  # several workers and their heartbeats write to one file: wait for the lock, don't fail
OUTAGE_S = 120  # how long a worker waits for a storage server that went away (a restart, a failover)
T = TypeVar("T")


def open_storage(spec: Spec, heartbeat: bool = False) -> optuna.storages.RDBStorage:
    """The study's RDB storage, its tables created if new. Workers pass heartbeat=True: a trial whose
    worker stops beating for `grace_period` seconds is failed and retried (up to `max_retry` times)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # A server's connections can go (a restart, an idle timeout, pg_terminate_backend): test each one as it
    # leaves the pool and reconnect, rather than fail the trial. Optuna turns this on for MySQL only.
    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite_file(spec.storage) else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        options: dict[str, Any] = {}  # RDBStorage's heartbeat keywords
        if heartbeat:
            # The retry inherits the reported epochs: it goes on from the dead attempt's checkpoint.
            retry = RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry, inherit_intermediate_values=True)
            options = {
                "heartbeat_interval": spec.heartbeat_interval,
                "grace_period": spec.grace_period,
                "heartbeat_stale_trial_callback": retry,
            }
        try:
            storage_class = RDBStorage if sqlite_file(spec.storage) else _reconnecting(RDBStorage)
            return retried(lambda: storage_class(sqlalchemy_url(spec.storage), engine_kwargs=engine, **options))
        except Exception as exc:  # a driver missing, a server down, a bad URL
            reason = redact(first_line(exc))
            raise ConfigError(f"study.storage={redact(spec.storage)}: cannot open it: {reason}") from exc


def create_study(spec: Spec) -> optuna.Study:
    """Create the study, or load it when it exists; refuse one optimised in other directions."""
    import optuna

    study = optuna.create_study(
        study_name=spec.name,
        storage=open_storage(spec, heartbeat=True),  # so fail_stale_trials finds the trials of dead workers
        # Spec._check allowed only these two.
        directions=cast("list[Literal['maximize', 'minimize']]", list(spec.directions)),
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
    """A dead worker's trial stays RUNNING: fail it (the retry callback queues it again) before counting the
    budget, or it would hold budget that no one spends. A worker of this host whose process is gone is dead
    at once; others once their heartbeat is `grace_period` seconds stale."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        _fail_dead_local_trials(study)


def worker_identity() -> dict[str, str | int | None]:
    """What a trial records of the process that runs it (its `worker` user attribute)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _fail_dead_local_trials(study: optuna.Study) -> None:
    """As optuna.storages.fail_stale_trials does for stale heartbeats, for trials whose worker was a process
    of this host that no longer exists: fail each (once, whichever process gets there first), end its
    MLflow run KILLED, and hand it to the heartbeat's retry callback (the retry inherits its epochs)."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage  # as Optuna's own fail_stale_trials: the retry callback lives there
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _dead_here(trial.user_attrs.get("worker")):
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process failed it first
    # The heartbeat's retry callback, on an RDBStorage or the cache Optuna wraps it in.
    retry = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    for trial_id in failed:
        trial = storage.get_trial(trial_id)
        _end_run(trial)
        if retry is not None:
            retry(study, trial)


def _dead_here(worker: object) -> bool:
    """Whether a trial's worker ran on this host and its process is gone (or its pid is now another's)."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname() or "pid" not in worker:
        return False
    pid = int(worker["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a process of another user: not our worker if the start times differ
    stat = _stat(pid)
    if stat is None:  # no /proc (not Linux): the process exists, so the heartbeat decides
        return False
    started = worker.get("started")
    # A zombie (killed, not yet reaped) is dead; a pid reused by a later process has another start time.
    return stat[0] == "Z" or (started is not None and int(stat[19]) != started)


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), to tell a reused pid from our worker; Linux only."""
    stat = _stat(pid)
    return None if stat is None else int(stat[19])


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the third on (state, ppid, ...; start time is [19])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and parentheses


def _end_run(trial: optuna.trial.FrozenTrial) -> None:
    """The dead worker never ended its trial's MLflow run: end it KILLED now (the retry, if any, says so too)."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "state", "FAIL")
            client.set_tag(run_id, "workbench.failure", "lost")
            client.set_tag(run_id, "workbench.stopped", f"worker {trial.user_attrs['worker']['pid']} died")
            client.set_terminated(run_id, "KILLED")
    except MlflowException as exc:  # a run in another store, or the store away: the retry ends it
        log.warning("Trial %d: could not end its MLflow run %s: %s", trial.number, run_id, redact(str(exc)))


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases."""
    from sqlalchemy.engine import make_url

    if not url.startswith("sqlite:"):
        return None
    database = make_url(url).database
    return Path(database) if database is not None else None  # `sqlite://` is in memory: no file


def retried(call: Callable[[], T], outage_s: float = OUTAGE_S) -> T:
    """`call()`, made again while the storage server cannot be reached, for up to `outage_s` seconds.

    The engine's pool_pre_ping replaces connections that died while idle; this covers a server that is away
    while a worker opens the storage or makes a call (a restart, a failover: up to two minutes)."""
    import optuna
    from sqlalchemy.exc import OperationalError

    deadline = time.monotonic() + outage_s
    while True:
        try:
            return call()
        # The connection's errors (refused, terminated, reset), bare or as Optuna wraps them.
        except (OperationalError, optuna.exceptions.StorageInternalError) as exc:
            cause = exc if isinstance(exc, OperationalError) else exc.__cause__
            if not isinstance(cause, OperationalError) or time.monotonic() > deadline:
                raise
            log.warning("The study's storage did not answer (%s); trying again", redact(first_line(cause)))
            time.sleep(2)


# The storage calls a study makes, each made again while the server is away (retried): the ones that open
# a database session, but delete_study, which the workbench never calls. Optuna's cache in front of an
# RDBStorage calls the private ones directly; the public create_new_trial, set_trial_param, get_all_trials
# and get_best_trial only delegate to them (retrying both would nest the waits). A create_new_study made
# again after its commit went through meets the study it made, which create_study(load_if_exists) loads.
RETRIED_CALLS = [
    "create_new_study",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "_create_new_trial",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "_get_trials",
    "_get_best_trial_id",
    "_get_stale_trial_ids",
    "record_heartbeat",
    "set_study_user_attr",
    "set_study_system_attr",
]


def _reconnecting(base: type[T]) -> type[T]:
    """RDBStorage whose calls wait out a storage server that went away (`retried`), heartbeats included:
    Optuna's heartbeat thread dies at the first error, and its trial would then count as lost.

    A call is made again only after a connection error. Should a server commit a write and drop the
    connection before answering (a restart at that very moment), a repeated create_new_trial would leave
    a trial that nothing runs; pool_pre_ping and the retry make every more likely case safe."""

    def make_again(name: str) -> Callable[..., Any]:
        method = getattr(base, name)

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            return retried(lambda: method(self, *args, **kwargs))

        return functools.wraps(method)(call)

    return cast(type[T], type(f"Reconnecting{base.__name__}", (base,), {n: make_again(n) for n in RETRIED_CALLS}))
