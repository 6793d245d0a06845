"""Why a trial failed, which decides what follows: the Optuna user attribute `failure` and the MLflow tag
`workbench.failure` of its run.

| cause       | what                                                        | then                                  |
| ----------- | ----------------------------------------------------------- | ------------------------------------- |
| `preempted` | stopped by a signal: SIGTERM, SLURM's SIGUSR2, Ctrl-C       | retried from its checkpoint           |
| `lost`      | its worker died without a word (process gone, heartbeat stale) | retried from its checkpoint        |
| `oom`       | out of memory (TensorFlow's ResourceExhaustedError, CUDA, MemoryError) | FAIL, not retried          |
| `diverged`  | the loss became NaN or infinite                             | FAIL, not retried                     |
| `invalid`   | no valid config for these parameters (a ConfigError)        | FAIL, not counted toward max_failures |
| `error`     | anything else                                               | FAIL, not retried                     |

Retries are up to `study.max_retry`. A trial FAILed by Optuna's heartbeat or by a worker that found its
process gone never ran code to say why: a FAIL trial without the attribute was `lost`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench.config import ConfigError

if TYPE_CHECKING:
    import optuna

# What TensorFlow, XLA and CUDA say when an allocation fails, whatever the exception type they raise it as.
_OOM_WORDS = ("out of memory", "oom when allocating", "resource_exhausted", "resource exhausted")


def of(exc: BaseException) -> str:
    """The cause of a trial's exception (or of what it was raised from)."""
    if isinstance(exc, KeyboardInterrupt):  # how workbench.signals delivers SIGTERM and SIGUSR2
        return "preempted"
    for link in _chain(exc):
        # By name: TensorFlow's and workbench.callbacks' classes, without importing TensorFlow here
        # (`workbench study status` reads causes and must answer at once).
        name = type(link).__name__
        if isinstance(link, MemoryError) or name == "ResourceExhaustedError":
            return "oom"
        if any(word in str(link).lower() for word in _OOM_WORDS):
            return "oom"
        if name == "Diverged":
            return "diverged"
        if isinstance(link, ConfigError):
            return "invalid"
    return "error"


def of_trial(trial: optuna.trial.FrozenTrial) -> str:
    """The cause of a FAIL trial."""
    return trial.user_attrs.get("failure") or "lost"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in seen:
        seen.append(link)
        link = link.__cause__ or link.__context__
    return seen
