"""What `python run.py` checks before Hydra runs a command: it answers --help, and refuses a command line
whose keys or values are wrong in one line, with exit status 2, before Hydra creates an output folder or
any store exists. Nothing here imports TensorFlow, Keras, MLflow or Optuna.

Every config the command would train is checked: for `--multirun`, each point of the grid. A study's
values are checked by its sweeper, which applies the study's base overrides first (study/preflight.py).
"""

from __future__ import annotations

import copy
import difflib
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from workbench.config import (
    ConfigError,
    check_choices,
    first_line,
    parse_overrides,
    sweep_values,
    validate,
    validate_launcher,
)

if TYPE_CHECKING:
    from hydra import initialize_config_dir
    from hydra.core.override_parser.types import Override

MULTIRUN = ("-m", "--multirun")
HELP = ("-h", "--help")
STUDY_WORKER_ONLY = (
    "a study runs its trials through the study sweeper: add --multirun (python run.py --multirun study=...)"
)


def check_command_line(argv: Sequence[str], conf: Path) -> None:
    """Print the help and exit 0 for --help; raise ConfigError for a command Hydra should not run.
    Flags other than --multirun and --help (--cfg, --info, --hydra-help, --config-name...) are Hydra's."""
    flags = [a for a in argv if a.startswith("-")]
    overrides = [a for a in argv if not a.startswith("-")]
    if any(flag not in (*MULTIRUN, *HELP) for flag in flags):
        return
    if any(flag in HELP for flag in flags):
        print(help_text(overrides, conf))
        raise SystemExit(0)
    check_overrides(overrides, conf, multirun=any(flag in MULTIRUN for flag in flags))


def check_overrides(overrides: Sequence[str], conf: Path, multirun: bool) -> None:
    """Refuse unknown options and keys, and any config of the run or grid that `validate` refuses."""
    check_choices(overrides, [conf])
    parsed = parse_overrides(overrides)
    if any(sweep_values(o) is None for o in parsed):
        return  # glob(...) or interval(...): only the launch knows their values
    if not multirun:
        for o in parsed:
            if o.is_sweep_override():
                raise ConfigError(
                    f"{o.input_line}: a sweep runs with --multirun; a list is written {o.get_key_element()}=[...]"
                )
    # Overrides that shape the composition (groups, Hydra's settings) are composed; the others are applied
    # to each composed config as Hydra applies them, which is much cheaper than composing each grid point.
    shaping = [o for o in parsed if _shapes_composition(o, conf)]
    values = [o for o in parsed if not _shapes_composition(o, conf)]
    with _hydra(conf):
        for point in itertools.product(*[_texts(o) for o in shaping]):
            composed = _compose(list(point))
            if multirun:
                validate_launcher(composed.hydra)
            cfg = _without_hydra(composed)
            known = _dotted_keys(cfg)
            for o in values:
                try:
                    _check_key(o, known)
                except ConfigError as exc:
                    if any(o.is_sweep_override() for o in shaping):  # say which point of the grid
                        raise ConfigError(f"{exc} (in the job with {' '.join(point)})") from None
                    raise
            if cfg.get("study") is not None:
                if not multirun and cfg.study.get("parent_run_id") is None:
                    raise ConfigError(STUDY_WORKER_ONLY)
                continue  # the sweeper checks the study's configs, base overrides included
            for assignment in itertools.product(*[[(o, v) for v in sweep_values(o) or []] for o in values]):
                job = copy.deepcopy(cfg)
                for o, value in assignment:
                    _apply(job, o, value)
                validate(job)


def help_text(overrides: Sequence[str], conf: Path) -> str:
    """Hydra's --help layout for this app: the groups of conf/ and their options, then the config the
    overrides compose. Hydra's own groups are left to --hydra-help (listing them all is what made
    Hydra's --help slow)."""
    with _hydra(conf):
        cfg = _compose(list(overrides))
    groups = "\n".join(f"{group}: {', '.join(options)}" for group, options in config_groups(conf).items())
    return "\n".join(
        [
            cfg.hydra.help.header,
            "== Configuration groups ==",
            "Compose your configuration from those groups (group=option)",
            "",
            groups,
            "",
            "== Config ==",
            "Override anything in the config (foo.bar=value)",
            "",
            OmegaConf.to_yaml(_without_hydra(cfg)),
            cfg.hydra.help.footer,
        ]
    )


def config_groups(conf: Path, parent: str = "") -> dict[str, list[str]]:
    """Each config group under `conf` (folders, nested ones as `a/b`) and its options; Hydra's excluded."""
    groups: dict[str, list[str]] = {}
    for folder in sorted(p for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        name = f"{parent}{folder.name}"
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options:
            groups[name] = options
        groups.update(config_groups(folder, parent=f"{name}/"))
    return groups


# --- composition ---------------------------------------------------------------------------------------


def _hydra(conf: Path) -> initialize_config_dir:
    from hydra import initialize_config_dir

    return initialize_config_dir(config_dir=str(conf), version_base="1.3")


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose
    from hydra.errors import HydraException

    try:
        return compose("config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:  # multi-line; the first says what is wrong
        raise ConfigError(first_line(exc)) from None


def _shapes_composition(override: Override, conf: Path) -> bool:
    key = override.key_or_group
    return (
        key == "hydra"
        or key.startswith(("hydra.", "hydra/"))
        or override.package is not None
        or "/" in key
        or (conf / key).is_dir()
    )


def _texts(override: Override) -> list[str]:
    """The override as Hydra's basic sweeper launches it: itself, or one `key=value` per sweep value."""
    if not override.is_sweep_override():
        return [str(override.input_line)]
    return [f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()]


def _without_hydra(cfg: DictConfig) -> DictConfig:
    app = copy.deepcopy(cfg)
    with open_dict(app):
        del app["hydra"]
    return app


# --- keys ----------------------------------------------------------------------------------------------


def _dotted_keys(cfg: DictConfig) -> list[str]:
    """Every key of the config in its order, sections included: `optimizer`, `optimizer.name`, ..."""
    keys: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            keys.append(f"{prefix}{key}")
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, list):  # its items are keys too: `schedule.boundaries_epochs.0`
                keys.extend(f"{prefix}{key}.{i}" for i in range(len(value)))

    walk(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False), "")
    return keys


def _check_key(override: Override, known: list[str]) -> None:
    key = override.key_or_group
    if (override.is_add() or override.is_force_add()) and (key == "study" or key.startswith("study.")):
        return  # the study's own forms: ++study.params={...}, +study.sampler.<option>=... (checked by Optuna)
    if key in known:
        return
    adding = " (+ adds keys only under study.: nothing else would read it)" if override.is_add() else ""
    raise ConfigError(f"{override.get_key_element()}: no such key{adding}; {_nearest(key, known)}")


def _nearest(key: str, known: list[str]) -> str:
    """The keys a misspelt one most likely meant, else the keys of its section."""
    section, _, leaf = key.rpartition(".")
    while section and section not in known:
        section = section.rpartition(".")[0]
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
    prefix = f"{section}." if section else ""
    close = [prefix + k for k in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)]
    if section != key.rpartition(".")[0]:  # a misspelt section (`optimzer.learning_rate`): whole keys
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.8)
    if close:
        return f"did you mean {' or '.join(close)}?"
    return f"{section or 'the config'} has: {', '.join(siblings)}"


def _apply(cfg: DictConfig, override: Override, value: Any) -> None:
    """One value override, as Hydra applies it after composition (ConfigLoaderImpl)."""
    key = override.key_or_group
    try:
        if override.is_delete():
            with open_dict(cfg):
                parent, _, leaf = key.rpartition(".")
                del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]
        elif (
            override.is_add()
            and OmegaConf.select(cfg, key, throw_on_missing=False) is not None
            and not isinstance(value, (dict, list))
        ):
            line = str(override.input_line)
            raise ConfigError(f"{line}: {key} is set already; set it with {line[1:]}")
        else:
            OmegaConf.update(cfg, key, value, merge=True, force_add=override.is_add() or override.is_force_add())
    except OmegaConfBaseException as exc:
        reason = first_line(exc)
        raise ConfigError(f"{override.get_key_element()}={value}: {reason}") from None
