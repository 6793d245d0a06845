"""The search space: `study.params` maps a config key to how Optuna samples it.

    params:
      optimizer.learning_rate: {type: float, low: 1.0e-4, high: 0.1, log: true}
      schedule.decay_factor:   {type: float, low: 0.8, high: 0.99}
      trainer.epochs:          {type: int, low: 5, high: 30, step: 5}
      trainer.batch_size:      {type: categorical, choices: [16, 32, 64]}
      optimizer:               {type: categorical, choices: [adam, momentum]}  # a config group

Each key is a dotted config key (or a config group) that a trial overrides as `key=value`. Parsing checks
each spec on its own; `preflight` checks the keys against the composed config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workbench.config import ConfigError

if TYPE_CHECKING:
    import optuna

FIELDS = {
    "float": ("low", "high", "log", "step"),
    "int": ("low", "high", "log", "step"),
    "categorical": ("choices",),
}


@dataclass(frozen=True)
class Param:
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            low, high = self._span()
            return trial.suggest_float(self.key, low, high, log=self.log, step=self.step)
        if self.type == "int":
            low_int, high_int, step = self._int_span()
            return trial.suggest_int(self.key, low_int, high_int, log=self.log, step=step)
        return trial.suggest_categorical(self.key, list(self.choices))

    def bounds(self) -> list[Any]:
        """The values at the edges of the space: preflight checks that each makes a valid config."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def grid(self) -> list[Any] | None:
        """Every value, for the grid sampler; None for a continuous float."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            low_int, high_int, step = self._int_span()
            return list(range(low_int, high_int + 1, step))
        if self.step is not None:
            low, high = self._span()
            count = math.floor((high - low) / self.step + 1e-9) + 1
            return [low + i * self.step for i in range(count)]
        return None

    def _span(self) -> tuple[float, float]:
        # parse() gives every float and int param both bounds; only a categorical has none.
        if self.low is None or self.high is None:
            raise ValueError(f"{self.key}: a {self.type} param needs low and high")
        return self.low, self.high

    def _int_span(self) -> tuple[int, int, int]:
        """low, high and step of an int param, which parse() checked are integers."""
        low, high = self._span()
        step = self.step or 1
        if not (isinstance(low, int) and isinstance(high, int) and isinstance(step, int)):
            raise ValueError(f"{self.key}: an int param needs integer low, high and step")
        return low, high, step

    def describe(self) -> str:
        if self.type == "categorical":
            return f"categorical {list(self.choices)}"
        extras = ", log" if self.log else ""
        extras += f", step {self.step}" if self.step is not None else ""
        return f"{self.type} [{self.low}, {self.high}]{extras}"


def parse(params: Mapping[Any, Any]) -> tuple[Param, ...]:
    """The search space from `study.params`; ConfigError names the first bad entry."""
    return tuple(_param(str(key), spec) for key, spec in params.items())


def _param(key: str, spec: Any) -> Param:
    where = f"study.params.{key}"
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ConfigError(f"{where}: give a mapping with a type, e.g. {{type: float, low: 0.0, high: 1.0}}")
    kind = spec["type"]
    if kind not in FIELDS:
        raise ConfigError(f"{where}.type={kind}: not one of {', '.join(FIELDS)}")
    unknown = sorted(set(spec) - {"type", *FIELDS[kind]})
    if unknown:
        raise ConfigError(f"{where}: {kind} takes {', '.join(FIELDS[kind])}, not {', '.join(unknown)}")
    if kind == "categorical":
        return Param(key, kind, choices=_choices(where, spec.get("choices")))

    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), bool(spec.get("log", False))
    low = _number(f"{where}.low", low, integer=kind == "int")
    high = _number(f"{where}.high", high, integer=kind == "int")
    if low >= high:
        raise ConfigError(f"{where}: low={low} >= high={high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, not low={low}")
    if step is not None:
        _number(f"{where}.step", step, integer=kind == "int")
        if step <= 0:
            raise ConfigError(f"{where}.step={step}: must be > 0")
        if log and not (kind == "int" and step == 1):
            raise ConfigError(f"{where}: log scale and step cannot be combined")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _number(where: str, value: Any, integer: bool) -> float:
    """The value, checked to be a finite number (an integer when `integer`)."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{where}={value}: must be {'an integer' if integer else 'a number'}")
    return value


def _choices(where: str, choices: Any) -> tuple[Any, ...]:
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ConfigError(f"{where}.choices: give a non-empty list, e.g. [16, 32, 64]")
    for choice in choices:
        # What Optuna can store: None, bool, int, float, str.
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise ConfigError(f"{where}.choices: {choice!r} is not a number, string, boolean or null")
    if len(set(map(repr, choices))) < len(choices):
        raise ConfigError(f"{where}.choices={list(choices)}: a choice is repeated")
    return tuple(choices)
