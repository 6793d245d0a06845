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

from workbench import tracking
from workbench.tracking import Terminated
from workbench.study import compose, interrupt, lock, samplers, storage, tally
from workbench.study.spec import Spec
from workbench.study.trial import Objective

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> int:
    """Run trials of `cfg.study` until its budget is spent, it times out or fails too often; return how
    many this worker ran."""
    hydra = HydraConfig.get()
    job = hydra.job.num
    spec = Spec.from_config(cfg.study, default_name=hydra.runtime.choices.study)
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
    with interrupt.stop_on_signals():
        while True:
            interrupt.check()
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
            except KeyboardInterrupt as stop:
                _hand_back(study, spec, objective.running)
                if isinstance(stop, Terminated):  # a scheduler stopped this job; the other workers go on
                    log.warning("Worker %d was stopped (%s); its trial goes back to the study", job, stop)
                    return ran
                raise
            finally:
                budget_lock.release()


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
