"""Validation, flattening and redaction of composed configs.

Nothing here imports TensorFlow: a bad config is refused in about a second, before any model is built.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf

from workbench.augment import POLICIES as AUGMENTATIONS
from workbench.models import ARCHITECTURES
from workbench.optim import OPTIMIZERS, SCHEDULES

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

# Option names come from the builders' registries (models, optim, augment: none imports TensorFlow at
# load). Data sources are still listed here: sources.py imports NumPy, which would cost a refusal ~0.3 s.
PRECISIONS = ("none", "bfloat16", "float16")
STRATEGIES = ("none", "mirrored")
CHECKPOINT_UPLOADS = ("none", "best", "last", "best_and_last", "every_epoch")
# What picks the best checkpoint: the metrics Keras logs at every epoch end.
MONITORED = ("val_accuracy", "val_loss", "val_top5_accuracy", "accuracy", "loss", "top5_accuracy")
# The URI schemes MLflow has a tracking store for (mlflow.tracking._tracking_service.utils), besides paths.
TRACKING_SCHEMES = (
    "file",
    "http",
    "https",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "databricks-uc",
    "uc",
)
# Groups whose options are files: an unknown option gets a one-line error before Hydra's long one.
CHOICE_GROUPS = ("model", "optimizer", "schedule", "augmentation", "data", "recipe", "trainer", "tracking", "study")
# Keys that steer a run but do not change what it computes: excluded from the config hash and params.
RUN_CONTROL_KEYS = ("trainer.resume", "trainer.checkpoint_dir")
# `model.weights: required` in a recipe: `???` cannot be used there, because merging `???` over the model
# group's `weights: null` keeps the null (OmegaConf merges skip missing values).
REQUIRED = "required"
_REQUIRED_HINTS = {
    "data.path": "a folder with one sub-folder per class (data=tfrecord: one workbench data build wrote), "
    "e.g. data.path=~/images",
    "model.weights": "a .keras checkpoint, an MLflow run or imagenet (needs network access), "
    "e.g. model.weights=runs:/<run id>",
}


class ConfigError(ValueError):
    """A bad config value or data path; the message is one line that names the key or file."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages span lines), else its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def parse_overrides(overrides: Iterable[str]) -> list[Override]:
    """Hydra's reading of command-line overrides; one that does not parse is a ConfigError naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for override in overrides:
        try:
            parsed.append(parser.parse_override(override))
        except HydraException as exc:
            reason = first_line(exc)
            raise ConfigError(f"{override}: not an override Hydra can read ({reason}); write key=value") from None
    return parsed


def sweep_values(override: Override) -> list[Any] | None:
    """The values an override takes: one, or each of a sweep (`a,b`, choice(...), range(...)); None for
    sweeps that only a launch can expand (glob(...) of a group, interval(...) of an Optuna-like sweeper)."""
    from hydra.core.override_parser.types import ValueType

    if not override.is_sweep_override():
        return [override.value()]
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP or not override.is_discrete_sweep():
        return None
    return list(override.sweep_iterator())


def check_choices(overrides: Iterable[str], config_dirs: Iterable[Path]) -> None:
    """Refuse `group=option` overrides naming an option that no config directory holds."""
    dirs = list(config_dirs)
    for override in parse_overrides(overrides):
        group = override.key_or_group
        if group not in CHOICE_GROUPS or override.is_delete():
            continue
        options = sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})
        for value in sweep_values(override) or []:
            for option in value if isinstance(value, list) else [value]:  # `db=[a,b]` picks both
                if option not in (None, "") and str(option) not in options:
                    raise ConfigError(f"{group}={option}: no such {group}; choose one of: {', '.join(options)}")


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
    _check_weights(model.weights, model.name)
    _check_freeze(model.freeze, model.weights)
    if not isinstance(model.new_classifier, bool):
        raise ConfigError(f"model.new_classifier={model.new_classifier}: must be true or false")
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
        _in_range(
            "schedule.warmup_epochs",
            sched.warmup_epochs,
            0.0,
            trainer.epochs,
            f"in [0, trainer.epochs={trainer.epochs})",
            closed_high=False,
        )
    if "min_learning_rate" in sched:
        _in_range(
            "schedule.min_learning_rate",
            sched.min_learning_rate,
            0.0,
            opt.learning_rate,
            "in [0, optimizer.learning_rate]",
        )
    if "boundaries_epochs" in sched:
        bounds = list(sched.boundaries_epochs)
        if not bounds or any(b <= 0 for b in bounds) or bounds != sorted(set(bounds)):
            raise ConfigError(f"schedule.boundaries_epochs={bounds}: must be increasing positive epochs")

    _one_of("augmentation.name", cfg.augmentation.name, AUGMENTATIONS)
    from workbench.sources import SOURCES  # here: sources imports this module

    _one_of("data.name", cfg.data.name, SOURCES)
    if "val_fraction" in cfg.data:
        _in_range(
            "data.val_fraction", cfg.data.val_fraction, 0.0, 1.0, "in (0, 1)", closed_low=False, closed_high=False
        )

    _positive("trainer.batch_size", trainer.batch_size, integer=True)
    for key in ("steps_per_epoch", "validation_steps"):
        if trainer[key] is not None:
            _positive(f"trainer.{key}", trainer[key], integer=True)
    _in_range("trainer.label_smoothing", trainer.label_smoothing, 0.0, 1.0, "[0, 1)", closed_high=False)
    _one_of("trainer.mixed_precision", trainer.mixed_precision, PRECISIONS)
    _one_of("trainer.distribute", trainer.distribute, STRATEGIES)
    _positive("trainer.gpus_per_job", trainer.gpus_per_job, integer=True)
    _check_freeze_epochs(trainer.freeze_epochs, trainer.epochs, model.freeze)
    _check_cv_folds(trainer.cv_folds, cfg.data.name)
    _one_of("tracking.checkpoints", tracking.checkpoints, CHECKPOINT_UPLOADS)
    _one_of("tracking.monitor", tracking.monitor, MONITORED)
    _one_of("tracking.monitor_mode", tracking.monitor_mode, ("auto", "min", "max"))
    _in_range("tracking.server_wait_s", tracking.server_wait_s, 0.0, math.inf, ">= 0 seconds")
    _positive("tracking.system_metrics_interval_s", tracking.system_metrics_interval_s)
    _check_tracking_uri(tracking.uri)


def _check_tracking_uri(uri: Any) -> None:
    if not uri:
        return  # MLflow's default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    from urllib.parse import urlparse

    # `postgresql+psycopg://` names a driver; a one-letter scheme is a Windows drive, that is a folder.
    scheme = urlparse(str(uri)).scheme.lower().partition("+")[0]
    if len(scheme) <= 1 or scheme in TRACKING_SCHEMES or scheme in _tracking_plugin_schemes():
        return
    raise ConfigError(
        f"tracking.uri={redact(str(uri))}: MLflow cannot track there; use null (sqlite:///mlflow.db here), "
        "http(s)://host:port (a tracking server), sqlite:///file.db, postgresql://, mysql://, mssql://, "
        "file:/folder or a folder, or databricks"
    )


def _tracking_plugin_schemes() -> set[str]:
    # Tracking-store plugins register further schemes through this entry point group (MLflow's docs).
    from importlib.metadata import entry_points

    return {e.name for e in entry_points(group="mlflow.tracking_store")}


def validate_launcher(hydra_cfg: DictConfig) -> None:
    """Refuse launcher settings that would fail only once a multirun's stores and runs exist."""
    launcher = hydra_cfg.get("launcher") or {}
    if str(launcher.get("_target_", "")).endswith(".SlurmLauncher"):
        from workbench import slurm  # here: it loads submitit

        slurm.check_resources(launcher)
    if str(launcher.get("_target_", "")).endswith(".JoblibLauncher"):
        n_jobs = launcher.get("n_jobs")
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0):
            raise ConfigError(
                f"hydra.launcher.n_jobs={n_jobs}: must be the number of jobs to run at once, "
                "e.g. 2 (or -1: one per CPU core)"
            )


def _required(key: str) -> str:
    return f"{key}: required by this config; give {_REQUIRED_HINTS.get(key, 'a value')}"


def _check_weights(weights: Any, architecture: str) -> None:
    if weights == REQUIRED:
        raise ConfigError(_required("model.weights"))
    if weights is None or weights == "imagenet":
        return
    if mlflow_reference(weights):
        return  # checked once MLflow loads, when the trainer fetches them (tracking.local_weights)
    path = Path(str(weights)).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights={weights}: no such file; use null, imagenet, or a checkpoint path")
    # A .keras file is a zip archive holding the model's config.json and metadata.json (Keras 3's format);
    # other files go to keras.applications as HDF5 weight files. Checked here, not after TensorFlow loads.
    if path.suffix == ".keras":
        if not _is_keras_archive(path):
            raise ConfigError(
                f"model.weights={weights}: not a Keras archive (a .keras zip with config.json and "
                "metadata.json), damaged or another format; give a checkpoint saved by Keras 3"
            )
        check_architecture(weights, path, architecture)
    elif path.suffix not in (".h5", ".hdf5") or not _is_hdf5(path):
        raise ConfigError(
            f"model.weights={weights}: neither a Keras archive (.keras) nor an HDF5 weights file (.h5); "
            "use null, imagenet, or a .keras checkpoint"
        )


def _check_freeze(freeze: Any, weights: Any) -> None:
    """none, backbone, or how many of the backbone's last layers stay trainable (a whole number)."""
    if freeze == "none":
        return
    if freeze != "backbone" and (isinstance(freeze, bool) or not isinstance(freeze, int) or freeze < 0):
        raise ConfigError(
            f"model.freeze={freeze}: must be none, backbone, or the number of the backbone's last layers "
            "left trainable (0 or more)"
        )
    if weights is None:
        raise ConfigError(
            f"model.freeze={freeze}: model.weights is null, so the frozen layers would keep their random "
            "initial values; give model.weights (imagenet or a .keras checkpoint) or model.freeze=none"
        )


def _check_freeze_epochs(epochs: Any, total: int, freeze: Any) -> None:
    """How many first epochs keep model.freeze before the backbone unfreezes: null, or 1 to trainer.epochs - 1."""
    if epochs is None:
        return
    _positive("trainer.freeze_epochs", epochs, integer=True)
    if freeze == "none":
        raise ConfigError(
            f"trainer.freeze_epochs={epochs}: model.freeze is none, so there is nothing to unfreeze; "
            "give model.freeze=backbone (or N) too"
        )
    if epochs >= total:
        raise ConfigError(
            f"trainer.freeze_epochs={epochs}: the backbone would never unfreeze in trainer.epochs={total}; "
            f"use fewer, or trainer.freeze_epochs=null to keep model.freeze={freeze} throughout"
        )


def _check_cv_folds(folds: Any, data: str) -> None:
    """null, or k >= 2 folds of a source whose examples can be picked one by one (not streamed records)."""
    if folds is None:
        return
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"trainer.cv_folds={folds}: must be null (no cross-validation) or a number of folds >= 2")
    if data == "tfrecord":
        raise ConfigError(
            f"trainer.cv_folds={folds}: data=tfrecord streams shards, which cannot be split into folds; "
            "cross-validate the image folder they were built from (data=image_folder data.path=...)"
        )


RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id, as the UI shows it


def mlflow_reference(value: Any) -> bool:
    """An MLflow run (a bare run id, `runs:/...`) or a registered model (`models:/...`)."""
    return isinstance(value, str) and (bool(RUN_ID.fullmatch(value)) or value.startswith(("runs:/", "models:/")))


def check_architecture(weights: Any, path: Path, architecture: str) -> None:
    """Refuse a .keras checkpoint of another architecture (the workbench names each model after its own)."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as archive:
        saved = json.loads(archive.read("config.json")).get("config", {}).get("name")
    if saved in ARCHITECTURES and saved != architecture:
        raise ConfigError(
            f"model.weights={weights}: a {saved} checkpoint, and model={architecture} cannot take its "
            f"weights; give a {architecture} checkpoint, or model={saved}"
        )


def _is_hdf5(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def _is_keras_archive(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return {"config.json", "metadata.json"} <= set(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


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
    key: str,
    value: Any,
    low: float,
    high: float,
    allowed: str,
    closed_low: bool = True,
    closed_high: bool = True,
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
_SECRET_VALUE = re.compile(
    rf"(?P<keep>[\w.+~-]*{_SECRET_WORDS}[\w.-]*[ \t]*[=:][ \t]*)(?!null\b)[^,\s}}\]]+", re.IGNORECASE
)
REDACTED = "***"


def redact(text: str) -> str:
    """Hide passwords in URLs (`postgresql://user:pw@host` -> `postgresql://user:***@host`) and the values
    of secret-named keys (`api_token=abc` -> `api_token=***`)."""
    text = _URL_PASSWORD.sub(lambda m: m.group("keep") + REDACTED, text)
    return _SECRET_VALUE.sub(lambda m: m.group("keep") + REDACTED, text)


def flatten(cfg: DictConfig | Mapping[Any, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to printable, redacted values: `{"optimizer.learning_rate": "0.045", ...}`."""
    # A DictConfig gives a dict; its keys may be any of OmegaConf's key types, printed as they are.
    container: Mapping[Any, Any] = (
        cast(dict[Any, Any], OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else cfg
    )
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
    """The config as YAML with every secret hidden, for artifacts and logs. Values are redacted before
    dumping: YAML folds long strings across lines, where a pattern over the text would miss them."""
    return OmegaConf.to_yaml(OmegaConf.create(_redacted(OmegaConf.to_container(cfg, resolve=resolve))))


def _redacted(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) and v is not None else _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def sqlalchemy_url(url: str) -> str:
    """`postgresql://...` names psycopg2 in SQLAlchemy; the workbench installs psycopg 3."""
    return url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url


def config_hash(cfg: DictConfig) -> str:
    """A short digest of everything that changes what a run computes (not tracking or run control)."""
    flat = {k: v for k, v in flatten(cfg).items() if not k.startswith("tracking.") and k not in RUN_CONTROL_KEYS}
    text = "\n".join(f"{k}={v}" for k, v in sorted(flat.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
