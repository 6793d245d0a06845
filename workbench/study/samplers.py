"""Optuna samplers and pruners from `study.sampler` and `study.pruner`.

Every key besides `name` (and the sampler's `seed`) is passed to the Optuna class, so any option Optuna
documents works: `sampler: {name: tpe, seed: 0, n_startup_trials: 5}`. The pruners' resource is epochs;
with `trainer.cv_folds` it is folds, which only `wilcoxon` (Optuna's WilcoxonPruner, made for instances
such as folds) compares.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import warnings
from typing import TYPE_CHECKING, Any

from workbench.config import ConfigError

if TYPE_CHECKING:
    import optuna
    from omegaconf import DictConfig

    from workbench.study.spec import Spec

SAMPLER_CLASSES = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "qmc": "QMCSampler",
    "nsga2": "NSGAIISampler",
    "grid": "GridSampler",
}
PRUNER_CLASSES = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "wilcoxon": "WilcoxonPruner",  # across the folds of trainer.cv_folds, not epochs
}
log = logging.getLogger(__name__)
_SAID: set[str] = set()
# Samplers whose Optuna class needs a package Optuna does not install.
NEEDS = {"cmaes": ("cmaes", "pip install cmaes"), "gp": ("torch", "pip install torch")}


def make_sampler(spec: Spec, seed: int | None) -> optuna.samplers.BaseSampler:
    """The study's sampler; `seed` (derived from study.sampler.seed by the worker) makes it reproducible."""
    import optuna

    options = dict(spec.sampler)
    name = options.pop("name")
    options.pop("seed", None)
    module, hint = NEEDS.get(name, (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(f"study.sampler.name={name}: needs the {module} package ({hint})")
    if name == "grid":
        options["search_space"] = {p.key: p.grid() for p in spec.params}
    if name == "tpe" and spec.workers > 1:
        # Parallel workers would otherwise be handed the same point while the first is still training.
        options.setdefault("constant_liar", True)
    return _construct(getattr(optuna.samplers, SAMPLER_CLASSES[name]), "study.sampler", name, options, seed=seed)


def make_pruner(spec: Spec, cfg: DictConfig) -> optuna.pruners.BasePruner:
    """The study's pruner for trials of `cfg` (before their parameters). Hyperband and successive halving
    count epochs: from 1 to trainer.epochs, or to the most epochs the search space allows."""
    import optuna

    options = dict(spec.pruner)
    name = options.pop("name")
    if name == "none":  # `study.pruner.name=none` turns pruning off, whatever options the file gave
        options = {}
    _check_resource(name, cfg.trainer.cv_folds)
    options = _drop_other_pruners_options(name, options)
    if name in ("hyperband", "successive_halving"):
        options.setdefault("min_resource", 1)  # 'auto' would wait for a finished trial to guess it
    if name == "hyperband":
        options.setdefault("max_resource", _max_epochs(spec, cfg))
    with warnings.catch_warnings():  # WilcoxonPruner is "experimental" (since Optuna 3.6): said in docs/studies.md
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _construct(getattr(optuna.pruners, PRUNER_CLASSES[name]), "study.pruner", name, options)


def _drop_other_pruners_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options that another pruner takes and this one does not came with the study file's pruner
    (`study.pruner.name=median` on a file with `percentile: 25.0`): dropped, saying so. An option that no
    pruner takes stays, to be refused as the typo it is."""
    import optuna

    def takes(pruner: str) -> set[str]:
        return set(inspect.signature(getattr(optuna.pruners, PRUNER_CLASSES[pruner])).parameters)

    others = set().union(*(takes(other) for other in PRUNER_CLASSES if other != name))
    dropped = sorted((set(options) - takes(name)) & others)
    message = f"study.pruner.name={name}: not taking {', '.join(dropped)} (the study file's pruner options)"
    if dropped and message not in _SAID:  # once: the preflight and an in-process worker both build the pruner
        _SAID.add(message)
        log.warning(message)
    return {key: value for key, value in options.items() if key not in dropped}


def _check_resource(pruner: str, folds: int | None) -> None:
    """Epoch pruners compare trials at the same epoch, WilcoxonPruner at the same fold: the two do not mix."""
    if folds and pruner not in ("none", "wilcoxon"):
        raise ConfigError(
            f"study.pruner.name={pruner}: it prunes by epoch, and trainer.cv_folds={folds} trials report folds; "
            "use study.pruner.name=wilcoxon (or none)"
        )
    if pruner == "wilcoxon" and not folds:
        raise ConfigError(
            "study.pruner.name=wilcoxon: it compares trials fold by fold; set trainer.cv_folds (5 or more: the "
            "test needs 4 folds to reach p < 0.1), or choose an epoch pruner"
        )


def _max_epochs(spec: Spec, cfg: DictConfig) -> int:
    """The epochs of the longest trial."""
    searched = {p.key: p for p in spec.params}.get("trainer.epochs")
    return cfg.trainer.epochs if searched is None else max(searched.bounds())


def _construct(cls: type, where: str, name: str, options: dict[str, Any], **fixed: Any) -> Any:
    accepted = [p for p in inspect.signature(cls).parameters if p not in fixed]
    for option in options:
        if option not in accepted:
            takes = ", ".join(p for p in accepted if p != "search_space") or "no options"
            raise ConfigError(f"{where}.{option}: {name} takes {takes}; drop it with ~{where}.{option}")
    try:
        return cls(**options, **fixed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {name} refused {options}: {exc}") from exc
