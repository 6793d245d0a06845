"""A study worker: one Hydra job that asks the shared study for trials until the budget is spent.

Workers, not batches: each worker starts its next trial as soon as its last one ends, whatever the other
workers are doing. `study.optimize` (not ask-and-tell) runs each trial, so Optuna's heartbeat marks the
trials of a worker that died, and the retry callback queues them again.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from optuna.storages import RetryHeartbeatStaleTrialCallback

from workbench import signals, tracking
from workbench.study import compose, keep, lock, samplers, storage, tally
from workbench.study.spec import Spec
from workbench.study.trial import Objective

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> int:
    """Run trials of `cfg.study` until its budget is spent, it times out or fails too often; return how
    many this worker ran."""
    hydra = HydraConfig.get()
    job = hydra.job.num
    spec = Spec.from_config(cfg.study, default_name=hydra.runtime.choices["study"])
    user = compose.user_overrides(hydra.overrides.task)
    base_cfg = compose.compose(compose.merge(spec.base_overrides, user))
    tracking.configure(base_cfg.tracking)  # the retry of a dead trial ends that trial's run

    study = optuna.load_study(
        study_name=spec.name,
        storage=storage.open_storage(spec, heartbeat=True),
        pruner=samplers.make_pruner(spec, base_cfg),
    )
    study.sampler = samplers.make_sampler(spec, _seed(spec, job, len(study.trials)))
    budget_lock = lock.for_study(spec)
    launch_id, deadline = cfg.study.launch_id, cfg.study.deadline
    objective = Objective(spec, user, cfg.study.parent_run_id, launch_id, budget_lock)
    ran = 0
    _quiet_stops()
    with signals.stop_on_signals():
        while True:
            if signals.received():  # between trials (its KeyboardInterrupt swallowed), or before the first
                log.warning("Worker %d was stopped (%s); it ran %d trials", job, _name(), ran)
                return ran
            budget_lock.acquire()
            try:
                storage.fail_stale_trials(study)
                reason = tally.stop_reason(study, spec, launch_id, deadline)
                if reason:
                    log.info("Worker %d stops (%s); it ran %d trials", job, reason, ran)
                    return ran
                # The objective releases the lock as soon as its trial exists.
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
                ran += 1
                if spec.keep is not None:  # a trial that entered the top displaces one, whose artifacts go now
                    keep.apply(study, spec.keep)
            except KeyboardInterrupt:
                _hand_back(study, spec, objective.running)
                # Return, not raise: a pool launcher (joblib) that sees a job raise kills the other workers,
                # which got the same Ctrl-C and are handing back their trials. The launching process knows
                # it was stopped (its own signal, or `signals.check()` in-process); with SIGTERM from a
                # scheduler for this job alone, the other workers go on.
                log.warning("Worker %d was stopped (%s); its trial goes back to the study", job, _name())
                return ran
            finally:
                budget_lock.release()


class _NoStopTraceback(logging.Filter):
    """Optuna logs a trial's KeyboardInterrupt with its traceback: a stop is expected, its one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] and issubclass(record.exc_info[0], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_stops() -> None:
    logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoStopTraceback) for f in logger.filters):
        logger.addFilter(_NoStopTraceback())


def _name() -> str:
    signum = signals.received()
    return signum.name if signum else "interrupted"


def _hand_back(study: optuna.Study, spec: Spec, number: int | None) -> None:
    """Queue the stopped trial again, as the heartbeat does for a dead worker's: its retry resumes from
    the epoch checkpoint, on whichever worker asks next (or at the next launch)."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None or trial.state != optuna.trial.TrialState.FAIL:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry, inherit_intermediate_values=True)(study, trial)


def _seed(spec: Spec, job: int, started_with: int) -> int | None:
    """A seed per worker and per launch: parallel workers don't draw the same points, and a resumed
    study doesn't draw its first points again. The same study file on a new storage draws the same."""
    seed = spec.sampler.get("seed")
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, job, started_with]).generate_state(1)[0])
