"""Everything the sweeper refuses before any trial runs: bad overrides, a search-space key the composed
config does not have, a parameter whose edge values make an invalid config, and samplers or pruners
Optuna would reject. Each refusal is a ConfigError with a one-line message.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from workbench.config import CHOICE_GROUPS, ConfigError, check_choices, first_line, validate
from workbench.study import compose, registry, samplers
from workbench.study.space import Param
from workbench.study.spec import Spec

_ABSENT = object()


def preflight(spec: Spec, user: Sequence[str]) -> DictConfig:
    """Check the study against the config it trains; return that config (base and user overrides)."""
    _refuse_sweeps(user)
    base = compose.merge(spec.base_overrides, user)
    check_choices(base, [compose.CONF])
    with compose.hydra_initialized():
        cfg = _compose(base, "study.base_overrides and the command line")
        validate(cfg)
        for param in spec.params:
            if param.key == "trainer.cv_folds":
                raise ConfigError(
                    "study.params.trainer.cv_folds: trials are compared on the same folds; set trainer.cv_folds "
                    "in study.base_overrides or on the command line"
                )
            if param.key in CHOICE_GROUPS:
                _check_group(param, base, compose.group_options(param.key))
            else:
                _check_key(param, cfg)
    registry.check_study(spec, cfg)
    samplers.make_sampler(spec, seed=None)
    samplers.make_pruner(spec, cfg)
    return cfg


def _refuse_sweeps(user: Sequence[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(user)):
        if override.is_sweep_override():
            raise ConfigError(
                f"{override.input_line}: a study searches with study.params, not with sweeps over overrides"
            )


def _compose(overrides: Sequence[str], what: str) -> DictConfig:
    try:
        return compose.compose(overrides)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra's composition errors span lines; the first says what is wrong
        raise ConfigError(f"{what}: {first_line(exc)}") from exc


def _check_group(param: Param, base: Sequence[str], options: list[str]) -> None:
    where = f"study.params.{param.key}"
    if param.type != "categorical":
        raise ConfigError(f"{where}: {param.key} is a config group; search it with type: categorical")
    for choice in param.choices:
        if choice not in options:
            raise ConfigError(f"{where}: no {param.key} named {choice}; choose among {', '.join(options)}")
        cfg = _compose(compose.merge(base, [compose.assign(param.key, choice)]), f"{where}={choice}")
        _validate(cfg, where, choice)


def _check_key(param: Param, cfg: DictConfig) -> None:
    where = f"study.params.{param.key}"
    current = OmegaConf.select(cfg, param.key, default=_ABSENT)
    if current is _ABSENT:
        raise ConfigError(f"{where}: the composed config has no key {param.key}")
    if isinstance(current, DictConfig):
        raise ConfigError(f"{where}: {param.key} is a section of the config, not a value")
    for value in param.bounds():
        # A value key needs no new composition: setting it is what the override does.
        trial_cfg = copy.deepcopy(cfg)
        OmegaConf.update(trial_cfg, param.key, value)
        _validate(trial_cfg, where, value)


def _validate(cfg: DictConfig, where: str, value: object) -> None:
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{where}: the value {value} makes an invalid config: {exc}") from exc
