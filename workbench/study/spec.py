"""The `study:` block of a study file: its schema with defaults, and the checked, normalised Spec.

The schema is registered with Hydra (hydra_plugins/workbench_sweeper/config.py), so a study file says only
what it changes and every key can be overridden on the command line (`study.n_trials=50`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from workbench.config import ConfigError, redact
from workbench.study import space

SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc", "nsga2", "grid")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon")
DIRECTIONS = ("maximize", "minimize")
# What the trainer returns: the last epoch's metrics and the model's parameter count.
METRICS = (
    "val_accuracy",
    "val_loss",
    "val_top5_accuracy",
    "accuracy",
    "loss",
    "top5_accuracy",
    "parameters",
    "images_per_second",
    "epoch_seconds",
)
STORAGE_SCHEMES = ("sqlite", "postgresql")  # the databases a budget lock exists for (storage.py)


@dataclass
class StudyConf:
    """What a study file may say under `study:`; documented in docs/studies.md."""

    name: str | None = None  # null = the study file's name
    base_overrides: list[str] = field(default_factory=list)  # every trial and the retrain command start here
    metric: Any = "val_accuracy"  # or a list of metrics: multi-objective
    direction: Any = "maximize"  # or a list, one per metric
    n_trials: int | None = None  # counted over the whole study, across restarts
    timeout: float | None = None  # seconds, for this launch
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": None})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    workers: int = 1
    storage: str = "sqlite:///optuna.db"
    max_failures: int = 10  # failed trials in one launch that stop the study
    heartbeat_interval: int = 60  # seconds between a running trial's heartbeats
    grace_period: int = 180  # seconds without a heartbeat after which a trial's worker counts as dead
    max_retry: int = 2  # how often a dead worker's trial is retried
    params: dict[str, Any] = field(default_factory=dict)
    # How many of the best trials keep their logged model and their checkpoints; null keeps every trial's.
    keep: Any = field(default_factory=lambda: {"models": 3, "checkpoints": 1})
    register: str | None = None  # a registered model: the best trial becomes its version `champion` at the end
    # Set by the sweeper for its workers; a study file leaves them alone.
    parent_run_id: str | None = None
    launch_id: str | None = None
    deadline: float | None = None  # unix time


@dataclass(frozen=True)
class Spec:
    name: str
    base_overrides: tuple[str, ...]
    metrics: tuple[str, ...]
    directions: tuple[str, ...]
    n_trials: int | None
    timeout: float | None
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    workers: int
    storage: str
    max_failures: int
    heartbeat_interval: int
    grace_period: int
    max_retry: int
    params: tuple[space.Param, ...]
    keep: Keep | None = None
    register: str | None = None

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def budget(self) -> int | None:
        """Trials to run over the whole study; a grid has no more points than it has."""
        if self.sampler["name"] != "grid":
            return self.n_trials
        # _check refuses a grid sampler over a continuous float, so every param has a grid here.
        size = math.prod(len(grid) for param in self.params if (grid := param.grid()) is not None)
        return min(size, self.n_trials or size)

    @classmethod
    def from_config(cls, study: DictConfig, default_name: str) -> Spec:
        """Check the study block; ConfigError names the first bad key."""
        node = cast(dict[str, Any], OmegaConf.to_container(study, resolve=True))  # a DictConfig gives a dict
        metrics, directions = _as_tuple(node["metric"]), _as_tuple(node["direction"])
        spec = cls(
            name=str(node["name"] or default_name),
            base_overrides=tuple(str(o) for o in node["base_overrides"]),
            metrics=metrics,
            directions=directions,
            n_trials=node["n_trials"],
            timeout=node["timeout"],
            sampler=dict(node["sampler"]),
            pruner=dict(node["pruner"]),
            workers=node["workers"],
            storage=str(node["storage"]),
            max_failures=node["max_failures"],
            heartbeat_interval=node["heartbeat_interval"],
            grace_period=node["grace_period"],
            max_retry=node["max_retry"],
            params=space.parse(node["params"]),
            keep=Keep.parse(node["keep"]),
            register=None if node["register"] is None else str(node["register"]),
        )
        spec._check()
        return spec

    def _check(self) -> None:
        for metric in self.metrics:
            _one_of("study.metric", metric, METRICS)
        for direction in self.directions:
            _one_of("study.direction", direction, DIRECTIONS)
        if len(self.metrics) != len(self.directions):
            raise ConfigError(
                f"study.direction={list(self.directions)}: give one direction per metric {list(self.metrics)}"
            )
        if self.n_trials is None and self.timeout is None and self.sampler.get("name") != "grid":
            raise ConfigError("study.n_trials and study.timeout are both null: set a budget")
        for key in ("n_trials", "timeout", "workers", "max_failures", "heartbeat_interval", "grace_period"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"study.{key}={value}: must be > 0")
        if self.max_retry < 0:
            raise ConfigError(f"study.max_retry={self.max_retry}: must be >= 0")
        if not self.params:
            raise ConfigError("study.params is empty: give the search space")
        _one_of("study.sampler.name", self.sampler.get("name"), SAMPLERS)
        _one_of("study.pruner.name", self.pruner.get("name"), PRUNERS)
        if self.multi_objective and self.pruner["name"] != "none":
            raise ConfigError(
                f"study.pruner.name={self.pruner['name']}: Optuna cannot prune a multi-objective study; use none"
            )
        if self.multi_objective and self.sampler["name"] == "cmaes":
            raise ConfigError("study.sampler.name=cmaes: CMA-ES handles one objective only; use nsga2 or tpe")
        if self.sampler["name"] == "grid" and any(p.grid() is None for p in self.params):
            floats = [p.key for p in self.params if p.grid() is None]
            raise ConfigError(f"study.sampler.name=grid: give {', '.join(floats)} a step or make it categorical")
        scheme = self.storage.split(":", 1)[0].split("+", 1)[0]
        if scheme not in STORAGE_SCHEMES or self.storage in ("sqlite://", "sqlite:///:memory:"):
            raise ConfigError(
                f"study.storage={redact(self.storage)}: workers share a SQLite file or a PostgreSQL "
                "database (sqlite:///optuna.db, postgresql://user@host/db)"
            )


@dataclass(frozen=True)
class Keep:
    """`study.keep`: the best `models` trials keep their logged model, the best `checkpoints` trials their
    checkpoint artifacts (a multi-objective study: its Pareto front); None keeps that kind for every trial."""

    models: int | None
    checkpoints: int | None

    @classmethod
    def parse(cls, node: Any) -> Keep | None:
        if node is None:
            return None
        if not isinstance(node, dict) or set(node) - {"models", "checkpoints"}:
            raise ConfigError(f"study.keep={node}: give {{models: K, checkpoints: K}} (or null to keep everything)")
        for key in ("models", "checkpoints"):
            value = node.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"study.keep.{key}={value}: a number of trials, 0 or more, or null for all")
        return cls(node.get("models"), node.get("checkpoints"))


def _as_tuple(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else (str(value),)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value}: not one of {', '.join(allowed)}")
