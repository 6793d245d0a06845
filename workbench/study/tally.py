"""Counting a study's trials, its best so far, and whether its budget is spent.

The budget is `study.n_trials` over the whole study, across restarts: finished (COMPLETE, PRUNED) and
RUNNING trials count; FAIL does not (the trial is run again with new parameters), nor WAITING (a retry
or an enqueued trial, not yet started). So rerunning a study runs only what is left.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workbench.study import causes

if TYPE_CHECKING:
    import optuna

    from workbench.study.spec import Spec


@dataclass(frozen=True)
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def counted(self) -> int:
        """The trials the budget counts."""
        return self.complete + self.pruned + self.running


def count(trials: Iterable[optuna.trial.FrozenTrial]) -> Counts:
    from optuna.trial import TrialState

    states = [t.state for t in trials]
    return Counts(
        complete=states.count(TrialState.COMPLETE),
        pruned=states.count(TrialState.PRUNED),
        failed=states.count(TrialState.FAIL),
        running=states.count(TrialState.RUNNING),
        waiting=states.count(TrialState.WAITING),
    )


def best(spec: Spec, trials: Iterable[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    """The complete trial with the best value of the (first) metric so far."""
    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    pick = max if spec.directions[0] == "maximize" else min
    return pick(complete, key=lambda t: t.values[0])


def failures(trials: Iterable[optuna.trial.FrozenTrial], launch_id: str) -> int:
    """Failed trials of this launch (an earlier launch's failures do not stop a rerun), but not those whose
    parameters made no valid config: a search space may hold some, and they cost no training."""
    from optuna.trial import TrialState

    return sum(
        1
        for t in trials
        if t.state == TrialState.FAIL and t.user_attrs.get("launch_id") == launch_id and causes.of_trial(t) != "invalid"
    )


def by_cause(trials: Iterable[optuna.trial.FrozenTrial]) -> dict[str, int]:
    """FAIL trials by cause (causes.py), most frequent first."""
    from optuna.trial import TrialState

    found = Counter(causes.of_trial(t) for t in trials if t.state == TrialState.FAIL)
    return dict(found.most_common())


def stop_reason(study: optuna.Study, spec: Spec, launch_id: str, deadline: float | None) -> str | None:
    """Why a worker should ask for no more trials, or None while there is budget left."""
    trials = study.get_trials(deepcopy=False)
    counts = count(trials)
    if spec.budget is not None and counts.counted >= spec.budget:
        return f"the budget of {spec.budget} trials is spent"
    if deadline is not None and time.time() >= deadline:
        return f"study.timeout={spec.timeout:g}s is up"
    failed = failures(trials, launch_id)
    if failed >= spec.max_failures:
        return f"{failed} trials failed (study.max_failures={spec.max_failures})"
    return None
