"""What `workbench eval` evaluates on: the run's own validation split, recomposed from the config it logged,
or a source given as data overrides (all of it, or its validation split), and the names that say which.

No TensorFlow here: overrides that do not compose and a run without its config are refused at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig, OmegaConf

from workbench.config import ConfigError, first_line, parse_overrides

if TYPE_CHECKING:
    from workbench.sources import Source, Split

OWN_SPLIT = "val"  # the dataset name of a run's own validation split


def check_overrides(overrides: Sequence[str]) -> None:
    """Only the data group may change: the model is the one given, and nothing is trained."""
    for override in parse_overrides(overrides):
        key = override.key_or_group
        if key != "data" and not key.startswith("data."):
            text = override.input_line or key
            raise ConfigError(f"{text}: only data overrides choose what to evaluate on, e.g. data.path=~/holdout")


def names_data(overrides: Sequence[str]) -> bool:
    """The overrides choose a data source of their own (`data=...`): the run's config is not needed."""
    return any(o.partition("=")[0].lstrip("+~") == "data" for o in overrides)


def run_data(run_id: str) -> DictConfig | None:
    """The data config the run trained with, from the resolved config it logged (None: it logged none)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="config/config.yaml", dst_path=folder
            )
            logged = OmegaConf.load(path)
            data = logged.get("data") if isinstance(logged, DictConfig) else None
        except (MlflowException, OSError):
            data = None
    return data if isinstance(data, DictConfig) and "name" in data else None


def data_config(overrides: Sequence[str], own: DictConfig | None) -> tuple[DictConfig, str]:
    """The data config to evaluate on, and which examples: `val` (the run's own validation split),
    `validation` (another source's validation split) or `all`."""
    if not overrides:
        if own is not None:
            return own, OWN_SPLIT
        return _compose([]), "validation"  # a checkpoint file: the default data
    base = [] if own is None or names_data(overrides) else [f"data={own.name}"]
    data = _compose([*base, *overrides])
    if own is not None and _normalised(data) == _normalised(own):
        return own, OWN_SPLIT
    if any(o.partition("=")[0].lstrip("+~") == "data.val_fraction" for o in overrides):
        return data, "validation"
    if "val_fraction" in data:
        # Every example is evaluated, so the split does not matter; a half keeps a small folder (two images
        # a class) from being refused for an empty validation split.
        data = cast(DictConfig, OmegaConf.merge(data, {"val_fraction": 0.5}))  # a mapping merged: a DictConfig
    return data, "all"


def _compose(overrides: list[str]) -> DictConfig:
    """The data group as `python run.py <overrides>` would compose it, checked as training checks it."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from workbench.config import check_choices, validate
    from workbench.study import compose

    check_choices(overrides, [compose.CONF])
    try:
        cfg = compose.compose(overrides)
        OmegaConf.to_container(cfg.data, resolve=True)  # an interpolation that does not resolve fails here
    except (HydraException, OmegaConfBaseException) as exc:
        # Hydra says which override failed; the OmegaConf error it chains says why (`Key 'path' is not in struct`).
        reason = first_line(exc) + (f" {first_line(exc.__cause__)}" if exc.__cause__ else "")
        raise ConfigError(
            f"{' '.join(overrides)}: these data overrides do not compose ({reason}); "
            "e.g. data=image_folder data.path=~/holdout"
        ) from None
    validate(cfg)
    return cfg.data


def _normalised(data_cfg: DictConfig) -> dict[str, Any]:
    """For comparing data configs: paths made absolute, so `images` and `./images/` are the same folder."""
    values: dict[str, Any] = OmegaConf.to_container(data_cfg, resolve=True)  # type: ignore[assignment]
    if values.get("path"):
        values["path"] = str(Path(str(values["path"])).expanduser().resolve())
    return values


def load_source(data_cfg: DictConfig, size: int, own: bool) -> Source:
    from workbench import sources

    try:
        return sources.load(data_cfg, size)
    except ConfigError as exc:
        if own:  # a relative data.path means the folder training started in
            raise ConfigError(f"{exc} (the run's own data: run where it trained, or give data.path=)") from None
        raise


def splits(source: Source, split: str) -> list[Split]:
    return [source.train, source.val] if split == "all" else [source.val]


def check_classes(model_names: list[str], source: Source, reference: str) -> None:
    data_names = source.class_names
    if model_names == data_names:
        return
    i = next((i for i, (a, b) in enumerate(zip(model_names, data_names, strict=False)) if a != b), None)
    where = f": class {i} is {model_names[i]!r} for the model, {data_names[i]!r} in the data" if i is not None else ""
    raise ConfigError(
        f"{reference}: the model's classes ({names(model_names)}) are not data {source.name}'s "
        f"({names(data_names)}){where}; evaluate on data with the same class names, in the same order"
    )


def names(names: list[str], shown: int = 12) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def dataset_name(source: Source, split: str, crops: int) -> str:
    """The name metrics and artifacts carry: eval_<dataset>_top1, eval/<dataset>/."""
    name = OWN_SPLIT if split == OWN_SPLIT else key(source.name) + ("_val" if split == "validation" else "")
    return f"{name}_10crop" if crops == 10 else name


def key(text: str) -> str:
    """Characters MLflow accepts in metric keys and that name a folder plainly."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "data"


def described(source: Source, split: str) -> str:
    if split == "all":
        return f"all of {source.name} ({source.uri})"
    whose = "the run's own" if split == OWN_SPLIT else "the"
    return f"{whose} validation split of {source.name}"


def details(reference: str, source: Source, split: str, crops: int, architecture: str, size: int) -> dict[str, Any]:
    return {
        "model": reference,
        "architecture": architecture,
        "input_size": size,
        "data": source.name,
        "data_uri": source.uri,
        "data_digest": source.digest,
        "split": split,
        "crops": crops,
    }
