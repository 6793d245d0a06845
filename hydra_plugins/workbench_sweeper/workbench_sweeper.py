"""The study sweeper: `python run.py --multirun study=<name>` (why our own: see config.py).

In the launching process it (1) checks the study, (2) creates the Optuna study and the MLflow store,
(3) opens the MLflow parent run, (4) launches `study.workers` jobs once through the selected Hydra launcher,
(5) shows progress while they run, and (6) reports at the end. The jobs are study workers
(workbench/study/worker.py). Optuna, MLflow and the study modules load only when a sweep starts: Hydra
imports this module whenever it scans its plugins.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from workbench import signals
from workbench.app import fail
from workbench.config import ConfigError, redact
from workbench.study.spec import Spec

if TYPE_CHECKING:
    import optuna

EXIT_STOPPED = 1  # the study stopped early: too many failed trials; a stop signal exits 128 + signal
# Launchers log each job's overrides; a storage URL among them may hold a password.
LAUNCHER_LOGGERS = (
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_joblib_launcher._core",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
)


class WorkbenchSweeper(Sweeper):
    def __init__(self) -> None:
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _setup_state(self) -> tuple[DictConfig, Launcher]:
        """The config and launcher that setup() keeps: Hydra calls it before sweep()."""
        if self.config is None or self.launcher is None:
            raise RuntimeError("WorkbenchSweeper.sweep() called before setup()")
        return self.config, self.launcher

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        from workbench.study import tally

        spec, study, run_id = self._start(arguments)
        if spec.budget is not None and tally.count(study.get_trials(deepcopy=False)).counted >= spec.budget:
            print(f"Study {spec.name} has run its {spec.budget} trials; raise study.n_trials to run more.")
            self._close(study, spec, run_id, "FINISHED")
            return []
        launch_id = uuid.uuid4().hex[:8]  # this launch's failed trials count against study.max_failures
        status, returns, stopped = "FAILED", [], False
        try:
            returns = self._launch_workers(arguments, spec, study, run_id, launch_id)
            stopped = tally.failures(study.get_trials(deepcopy=False), launch_id) >= spec.max_failures
            crashed = any(r.status == JobStatus.FAILED for r in returns)
            status = "FAILED" if stopped or crashed else "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            _fail_dead_trials(study)  # workers that a second Ctrl-C (or the launcher) ended mid-trial
        finally:
            self._close(study, spec, run_id, status)  # 6. whatever happened
        if status == "KILLED":
            print("Interrupted: rerun the same command to run the rest of the study.", file=sys.stderr)
            raise SystemExit(signals.exit_status())
        for job in returns:
            _ = job.return_value  # re-raises a worker's crash, as Hydra's own sweeper does
        if stopped:
            fail(_stopped_message(study, spec, launch_id), status=EXIT_STOPPED)
        return returns

    def _start(self, arguments: list[str]) -> tuple[Spec, optuna.Study, str]:
        from workbench.server import check_server
        from workbench.study import compose, preflight

        config, _ = self._setup_state()
        if config.get("study") is None:
            fail("hydra/sweeper=workbench runs an Optuna study: add study=<name> (a file in studies/)")
        study_file = config.hydra.runtime.choices.get("study")
        try:
            # 1. Refuse what is wrong before any database, run or trial exists.
            spec = Spec.from_config(config.study, default_name=study_file)
            base_cfg = preflight.preflight(spec, compose.user_overrides(arguments))
            # 2. The study and the MLflow store, created here once, before any worker starts.
            check_server(base_cfg.tracking)
            from workbench import tracking  # MLflow: not loaded for a refusal
            from workbench.study import parent, storage

            tracking.configure(base_cfg.tracking)
            study = storage.create_study(spec)
        except ConfigError as exc:
            fail(str(exc))
        # 3. The parent run, re-opened when the study was launched before.
        run_id = parent.open_run(study, spec, base_cfg.tracking.experiment, study_file)
        storage.fail_stale_trials(study)  # so that the budget below does not count a dead worker's trial
        return spec, study, run_id

    def _launch_workers(
        self, arguments: list[str], spec: Spec, study: optuna.Study, run_id: str, launch_id: str
    ) -> list[JobReturn]:
        from workbench.study import compose, tally
        from workbench.study.progress import Progress

        config, hydra_launcher = self._setup_state()
        launcher = config.hydra.launcher._target_.rsplit(".", 1)[-1]
        counts = tally.count(study.get_trials(deepcopy=False))
        left = f"{spec.budget - counts.counted} of {spec.budget} trials left" if spec.budget else "no trial limit"
        print(
            f"Study {spec.name}: {left}, {spec.workers} worker(s) through {launcher}; "
            f"storage {redact(spec.storage)}; MLflow parent run {run_id}"
        )
        if spec.workers > 1 and launcher == "BasicLauncher":
            print("  The basic launcher runs workers one after another; hydra/launcher=joblib runs them at once.")
        # 4. Workers, not batches: each job asks the study for trials until the budget is spent.
        worker = compose.merge(
            arguments,
            [
                compose.assign("study.name", spec.name),
                compose.assign("study.parent_run_id", run_id),
                compose.assign("study.launch_id", launch_id),
                compose.assign("study.deadline", time.time() + spec.timeout if spec.timeout else None),
            ],
        )
        _redact_launcher_logs()
        # 5. A progress line and the parent run's metrics while the workers run. Workers in other processes
        # (joblib, submitit) are in this process group: Ctrl-C reaches each, and each hands back its trial
        # and returns. Raising here meanwhile would make the launcher kill them half-way (joblib does), so
        # this process waits for them (`defer`), then raises.
        with signals.stop_on_signals(defer=launcher != "BasicLauncher"), Progress(study, spec, run_id):
            try:
                returns = hydra_launcher.launch([worker] * spec.workers, initial_job_idx=0)
            except Exception:
                if signals.received() is None:
                    raise
                # The launcher ended its jobs on the stop (submitit's local controller kills them a second
                # after forwarding the signal): the trials of those that died are failed on the way out.
                returns = []
        signals.check()  # a stop deferred, or whose KeyboardInterrupt Python swallowed
        return list(returns)

    def _close(self, study: optuna.Study, spec: Spec, run_id: str, status: str) -> None:
        """Best config, retrain command and plots to the parent run, which ends; the summary."""
        from workbench import tracking
        from workbench.study import keep, parent, report

        if spec.keep is not None:
            keep.apply(study, spec.keep)
        with TemporaryDirectory() as tmp:
            report.write_best(study, spec, Path(tmp))
            report.write_plots(study, spec, Path(tmp) / "plots")
            parent.log_progress(run_id, spec, study)
            parent.finish(run_id, status, Path(tmp))
        print(report.summary(study, spec, tracking.ui_hint(run_id)))
        if status == "FINISHED" and spec.register is not None:
            _register(study, spec, spec.register)


def _register(study: optuna.Study, spec: Spec, name: str) -> None:
    """`study.register`: the best trial's model as the registered model's champion. After the parent run has
    ended: a registration that fails (exit status 1) leaves the study closed."""
    from mlflow.exceptions import MlflowException

    from workbench.config import first_line
    from workbench.study import registry, report

    try:
        trial = registry.trial_to_register(study, spec, None)
        registered = registry.register(trial, spec, name)
    except (ConfigError, MlflowException) as exc:
        fail(f"study.register={name}: not registered: {redact(first_line(exc))}", status=1)
    print("\n".join(registered.lines(spec, report.values_text(spec, trial))))


def _stopped_message(study: optuna.Study, spec: Spec, launch_id: str) -> str:
    ended = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("launch_id") == launch_id]
    # A trial tagged with a launch has started; datetime.min only satisfies the type of datetime_start.
    last = max(ended, key=lambda t: t.datetime_complete or t.datetime_start or datetime.min)
    return (
        f"study {spec.name} stopped: {spec.max_failures} trials failed (study.max_failures); "
        f"the last, trial {last.number}: {last.user_attrs.get('error', 'no error recorded')}"
    )


def _fail_dead_trials(study: optuna.Study) -> None:
    """Fail (and queue again) the trials of local workers that no longer exist; best effort on the way out."""
    import optuna

    from workbench.study import storage

    try:
        storage.fail_stale_trials(study)
    except (optuna.exceptions.OptunaError, OSError) as exc:  # the next launch does it again
        logging.getLogger(__name__).warning("Could not fail the trials of stopped workers: %s", redact(str(exc)))


class _Redacted(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def _redact_launcher_logs() -> None:
    for name in LAUNCHER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Redacted) for f in logger.filters):
            logger.addFilter(_Redacted())
