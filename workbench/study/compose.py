"""How a trial's config is put together: the study's base overrides, then the user's command-line
overrides, then the trial's parameters, composed by Hydra exactly as `python run.py <overrides>` would.

The same override list is the retrain command, so what a trial trained is what `workbench study best`
prints.
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, open_dict

from workbench.config import redact

if TYPE_CHECKING:
    from workbench.train import RunContext

CONF = Path(__file__).resolve().parents[2] / "conf"
_BARE = re.compile(r"[A-Za-z_/][\w./-]*")  # a string Hydra reads back as the same string, unquoted


@contextlib.contextmanager
def hydra_initialized() -> Iterator[None]:
    """Hydra's config search path: the running app's (sweeper, workers), else conf/ (the CLI, tests)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose(overrides: Iterable[str]) -> DictConfig:
    """The config `python run.py <overrides>` trains."""
    from hydra import compose as hydra_compose

    with hydra_initialized():
        return hydra_compose("config", overrides=list(overrides))


def compose_run(overrides: list[str], run_control: Iterable[str] = ()) -> tuple[DictConfig, RunContext]:
    """The config `python run.py <overrides> <run_control>` trains, and its run context: these overrides'
    own group choices (not the running job's, which Hydra's globals describe). `run_control` (where
    checkpoints go, the run's name) is left out of the context's overrides, so not in the retrain command."""
    from hydra import compose as hydra_compose

    from workbench.train import RunContext

    with hydra_initialized():
        cfg = hydra_compose("config", overrides=[*overrides, *run_control], return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, RunContext(choices, list(overrides))


def group_options(group: str) -> list[str]:
    """The options of a config group (`optimizer` -> adam, momentum, ...)."""
    from hydra.core.global_hydra import GlobalHydra

    with hydra_initialized():
        return GlobalHydra.instance().config_loader().get_group_options(group)


def key_of(override: str) -> str:
    """`+trainer.epochs=3` -> `trainer.epochs`; `~model` -> `model`."""
    return override.partition("=")[0].lstrip("+~")


def is_study_override(override: str) -> bool:
    key = key_of(override)
    return key == "study" or key.startswith("study.")


def user_overrides(task_overrides: Iterable[str]) -> list[str]:
    """The command line's overrides that shape the trained model; the study's own steer the search."""
    return [o for o in task_overrides if not is_study_override(o)]


def assign(key: str, value: Any) -> str:
    """`key=value` in Hydra's override syntax, reading back as the same Python value."""
    return f"{key}={_hydra_value(value)}"


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in ("null", "true", "false", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def merge(*lists: Iterable[str]) -> list[str]:
    """One override per key, the later list winning: the user's beat the study's, the trial's beat both."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            merged.pop(key_of(override), None)
            merged[key_of(override)] = override
    return list(merged.values())


def trial_overrides(base: Iterable[str], user: Iterable[str], params: Mapping[str, Any]) -> list[str]:
    return merge(base, user, [assign(key, value) for key, value in params.items()])


def command(overrides: Iterable[str]) -> str:
    """The shell command that trains these overrides, secrets hidden."""
    return " ".join(["python", "run.py", *(shlex.quote(redact(o)) for o in overrides)])
