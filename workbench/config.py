"""Validation, flattening and redaction of composed configs.

Nothing here imports TensorFlow: a bad config is refused in about a second, before any model is built.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from workbench.models import ARCHITECTURES

OPTIMIZERS = ("momentum", "nesterov", "rmsprop", "adam", "adamw")
SCHEDULES = ("constant", "exponential", "cosine", "piecewise")
AUGMENTATIONS = ("none", "flip_crop", "inception", "mixup")
DATASETS = ("digits", "image_folder", "synthetic")
PRECISIONS = ("none", "bfloat16", "float16")
STRATEGIES = ("none", "mirrored")
CHECKPOINT_UPLOADS = ("none", "best", "last", "best_and_last", "every_epoch")
# Groups whose options are files: an unknown option gets a one-line error before Hydra's long one.
CHOICE_GROUPS = ("model", "optimizer", "schedule", "augmentation", "data", "recipe", "trainer", "tracking", "study")
# Keys that steer a run but do not change what it computes: excluded from the config hash and params.
RUN_CONTROL_KEYS = ("trainer.resume", "trainer.checkpoint_dir")
# `model.weights: required` in a recipe: `???` cannot be used there, because merging `???` over the model
# group's `weights: null` keeps the null (OmegaConf merges skip missing values).
REQUIRED = "required"
_REQUIRED_HINTS = {
    "data.path": "a folder with one sub-folder per class, e.g. data.path=~/images",
    "model.weights": "a .keras checkpoint or imagenet (needs network access), e.g. model.weights=~/run/last.keras",
}


class ConfigError(ValueError):
    """A bad config value or data path; the message is one line that names the key or file."""


def check_choices(overrides: Iterable[str], config_dirs: Iterable[Path]) -> None:
    """Refuse `group=option` overrides naming an option that no config directory holds."""
    dirs = list(config_dirs)
    for override in overrides:
        key, sep, value = override.partition("=")
        group = key.lstrip("+~")
        if not sep or group not in CHOICE_GROUPS or value in ("", "null"):
            continue
        options = sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})
        for option in _sweep_values(value):
            if option not in options:
                raise ConfigError(f"{group}={option}: no such {group}; choose one of: {', '.join(options)}")


def _sweep_values(value: str) -> list[str]:
    # `model=resnet50,inception_v3` sweeps; choice(...) and range(...) are Hydra's own sweep syntax.
    inner = re.fullmatch(r"choice\((.*)\)", value)
    return [v.strip() for v in (inner.group(1) if inner else value).split(",") if v.strip()]


def validate(cfg: DictConfig) -> None:
    """Check every value the trainer relies on; raise ConfigError naming the first bad key."""
    # First: reading a `???` value (data.path of data=image_folder) raises omegaconf's multi-line error.
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(_required(missing[0]))
    model, opt, sched, trainer, tracking = cfg.model, cfg.optimizer, cfg.schedule, cfg.trainer, cfg.tracking
    _one_of("model.name", model.name, ARCHITECTURES)
    arch = ARCHITECTURES[model.name]
    if model.input_size is not None:
        _number("model.input_size", model.input_size, integer=True)
        if model.input_size < arch.min_size:
            raise ConfigError(
                f"model.input_size={model.input_size}: {model.name} needs at least {arch.min_size} pixels"
            )
    _in_range("model.dropout", model.dropout, 0.0, 1.0, "[0, 1)", closed_high=False)
    _check_weights(model.weights)
    _one_of("model.jit_compile", str(model.jit_compile).lower(), ("auto", "true", "false"))

    _one_of("optimizer.name", opt.name, OPTIMIZERS)
    _positive("optimizer.learning_rate", opt.learning_rate)
    if "momentum" in opt:
        _in_range("optimizer.momentum", opt.momentum, 0.0, 1.0, "[0, 1)", closed_high=False)
    _in_range("optimizer.weight_decay", opt.weight_decay, 0.0, math.inf, ">= 0")
    if opt.clipnorm is not None:
        _positive("optimizer.clipnorm", opt.clipnorm)
    if opt.ema is not None:
        _in_range("optimizer.ema", opt.ema, 0.0, 1.0, "in (0, 1), e.g. 0.9999", closed_low=False, closed_high=False)

    # Before the schedule, whose warm-up check is relative to trainer.epochs.
    _positive("trainer.epochs", trainer.epochs, integer=True)
    _one_of("schedule.name", sched.name, SCHEDULES)
    if "decay_factor" in sched:
        _in_range("schedule.decay_factor", sched.decay_factor, 0.0, 1.0, "in (0, 1]", closed_low=False)
    if "epochs_per_decay" in sched:
        _positive("schedule.epochs_per_decay", sched.epochs_per_decay)
    if "warmup_epochs" in sched:
        _in_range("schedule.warmup_epochs", sched.warmup_epochs, 0.0, trainer.epochs, f"in [0, trainer.epochs={trainer.epochs})", closed_high=False)
    if "min_learning_rate" in sched:
        _in_range("schedule.min_learning_rate", sched.min_learning_rate, 0.0, opt.learning_rate, "in [0, optimizer.learning_rate]")
    if "boundaries_epochs" in sched:
        bounds = list(sched.boundaries_epochs)
        if not bounds or any(b <= 0 for b in bounds) or bounds != sorted(set(bounds)):
            raise ConfigError(f"schedule.boundaries_epochs={bounds}: must be increasing positive epochs")

    _one_of("augmentation.name", cfg.augmentation.name, AUGMENTATIONS)
    _one_of("data.name", cfg.data.name, DATASETS)
    if "val_fraction" in cfg.data:
        _in_range("data.val_fraction", cfg.data.val_fraction, 0.0, 1.0, "in (0, 1)", closed_low=False, closed_high=False)

    _positive("trainer.batch_size", trainer.batch_size, integer=True)
    for key in ("steps_per_epoch", "validation_steps"):
        if trainer[key] is not None:
            _positive(f"trainer.{key}", trainer[key], integer=True)
    _in_range("trainer.label_smoothing", trainer.label_smoothing, 0.0, 1.0, "[0, 1)", closed_high=False)
    _one_of("trainer.mixed_precision", trainer.mixed_precision, PRECISIONS)
    _one_of("trainer.distribute", trainer.distribute, STRATEGIES)
    _positive("trainer.gpus_per_job", trainer.gpus_per_job, integer=True)
    _one_of("tracking.checkpoints", tracking.checkpoints, CHECKPOINT_UPLOADS)


def _required(key: str) -> str:
    return f"{key}: required by this config; give {_REQUIRED_HINTS.get(key, 'a value')}"


def _check_weights(weights: Any) -> None:
    if weights == REQUIRED:
        raise ConfigError(_required("model.weights"))
    if weights is None or weights == "imagenet":
        return
    path = Path(str(weights)).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights={weights}: no such file; use null, imagenet, or a checkpoint path")


def _one_of(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value}: not one of {', '.join(map(str, allowed))}")


def _number(key: str, value: Any, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (not integer and not math.isfinite(value)):
        raise ConfigError(f"{key}={value}: must be {'an integer' if integer else 'a number'}")
    return value


def _positive(key: str, value: Any, integer: bool = False) -> None:
    if _number(key, value, integer) <= 0:
        raise ConfigError(f"{key}={value}: must be > 0")


def _in_range(
    key: str, value: Any, low: float, high: float, allowed: str,
    closed_low: bool = True, closed_high: bool = True,
) -> None:
    v = _number(key, value)
    above = v >= low if closed_low else v > low
    below = v <= high if closed_high else v < high
    if not (above and below):
        raise ConfigError(f"{key}={value}: must be {allowed}")


# --- flattening, hashing and redaction -------------------------------------------------------------------

_SECRET_WORDS = r"(?:password|passwd|secret|token|api_key|apikey|credential)"
_SECRET_KEY = re.compile(_SECRET_WORDS, re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]+:)[^@\s]+(?=@)")
# `db_password=...`, `api_token: ...` inside overrides, joined override strings and YAML lines.
_SECRET_VALUE = re.compile(rf"(?P<keep>[\w.+~-]*{_SECRET_WORDS}[\w.-]*[ \t]*[=:][ \t]*)(?!null\b)[^,\s]+", re.IGNORECASE)
REDACTED = "***"


def redact(text: str) -> str:
    """Hide passwords in URLs (`postgresql://user:pw@host` -> `postgresql://user:***@host`) and the values
    of secret-named keys (`api_token=abc` -> `api_token=***`)."""
    text = _URL_PASSWORD.sub(lambda m: m.group("keep") + REDACTED, text)
    return _SECRET_VALUE.sub(lambda m: m.group("keep") + REDACTED, text)


def flatten(cfg: DictConfig | Mapping, prefix: str = "") -> dict[str, str]:
    """Dotted keys to printable, redacted values: `{"optimizer.learning_rate": "0.045", ...}`."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, str] = {}
    for key, value in container.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{dotted}."))
        elif _SECRET_KEY.search(str(key)) and value is not None:
            flat[dotted] = REDACTED
        else:
            flat[dotted] = redact(str(value))
    return flat


def redacted_yaml(cfg: DictConfig | ListConfig, resolve: bool = True) -> str:
    """The config as YAML with every secret hidden, for artifacts and logs."""
    return redact(OmegaConf.to_yaml(cfg, resolve=resolve))


def sqlalchemy_url(url: str) -> str:
    """`postgresql://...` names psycopg2 in SQLAlchemy; the workbench installs psycopg 3."""
    return url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url


def config_hash(cfg: DictConfig) -> str:
    """A short digest of everything that changes what a run computes (not tracking or run control)."""
    flat = {k: v for k, v in flatten(cfg).items() if not k.startswith("tracking.") and k not in RUN_CONTROL_KEYS}
    text = "\n".join(f"{k}={v}" for k, v in sorted(flat.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
