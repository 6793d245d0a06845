"""The study-level progress line, and the parent run's metrics over time, while the workers run.

    study lr_batch_decay_dropout: 12/30 done (3 pruned), 1 failed, 2 running | best val_accuracy 0.9688
    (trial 7) | 4m10s elapsed, ~6m left

On a terminal the line updates in place; in a log it is printed when it changes, and every 30 seconds.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

import optuna

from workbench.study import parent, tally
from workbench.study.report import duration
from workbench.study.spec import Spec

log = logging.getLogger(__name__)
POLL_S = 2.0
LOG_EVERY_S = 30.0


class Progress:
    """A background thread that polls the storage: `with Progress(...): launcher.launch(...)`."""

    def __init__(self, study: optuna.Study, spec: Spec, parent_run_id: str, stream: TextIO = sys.stdout):
        self.study, self.spec, self.parent_run_id, self.stream = study, spec, parent_run_id, stream
        self.tty = stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="study-progress", daemon=True)
        self._start = time.monotonic()
        self._finished_at_start: int | None = None
        self._last: tally.Counts | None = None
        self._printed_at = 0.0

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._safe_update()
        if self.tty:
            self.stream.write("\n")

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self._safe_update()

    def _safe_update(self) -> None:
        try:
            self.update()
        except Exception as exc:  # a busy database must not end the study, nor hide why it ended
            log.debug("progress: %s", exc)

    def update(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        counts = tally.count(trials)
        if self._finished_at_start is None:
            self._finished_at_start = counts.finished
        changed = counts != self._last
        if changed:
            parent.log_progress(self.parent_run_id, self.spec, self.study)
            self._last = counts
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self.line(trials, counts) + "\x1b[K")
        elif changed or now - self._printed_at >= LOG_EVERY_S:
            self.stream.write(self.line(trials, counts) + "\n")
            self._printed_at = now
        self.stream.flush()

    def line(self, trials: list[optuna.trial.FrozenTrial], counts: tally.Counts) -> str:
        total = f"/{self.spec.budget}" if self.spec.budget else ""
        parts = [
            f"study {self.spec.name}: {counts.finished}{total} done ({counts.pruned} pruned), "
            f"{counts.failed} failed, {counts.running} running",
            self._best(trials),
            self._time(counts),
        ]
        return " | ".join(p for p in parts if p)

    def _best(self, trials: list[optuna.trial.FrozenTrial]) -> str:
        best = tally.best(self.spec, trials)
        if best is None:
            return ""
        if self.spec.multi_objective:
            return f"Pareto front {len(self.study.best_trials)} trials"
        return f"best {self.spec.metrics[0]} {best.value:.4g} (trial {best.number})"

    def _time(self, counts: tally.Counts) -> str:
        elapsed = time.monotonic() - self._start
        text = f"{duration(elapsed)} elapsed"
        done_here = counts.finished - (self._finished_at_start or 0)
        left = None
        if self.spec.budget and done_here > 0:
            left = elapsed / done_here * max(self.spec.budget - counts.finished, 0)
        if self.spec.timeout:
            left = min(left if left is not None else self.spec.timeout, max(self.spec.timeout - elapsed, 0))
        return f"{text}, ~{duration(left)} left" if left else text
