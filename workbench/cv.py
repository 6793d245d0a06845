"""k-fold cross-validation (`trainer.cv_folds=k`): k fresh models, each trained on k - 1 stratified folds
of the training split and validated on the remaining one, as MLflow child runs of one CV run.

The CV run logs each fold's final metrics (`fold_<metric>`, step = fold) and, over the folds, their mean and
standard deviation (`cv_<metric>_mean`, `cv_<metric>_std`); its result is the means, so `run.py` and a
study trial see `val_accuracy` as the mean over folds. The source's own validation split is not used: it
stays for the final check, a run of the chosen config without `trainer.cv_folds`.

A study's report hook is called once a fold, with the fold's metrics (step = fold, from 1), which is what
Optuna's WilcoxonPruner compares across trials. Folds that finished are never trained again: `cv.json` in
the checkpoint folder records them, and the folds' own epoch checkpoints (`fold-<i>/`) resume the one in
progress, on `trainer.resume=true` and on a study's retry of a trial whose worker died.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from omegaconf import DictConfig, OmegaConf

from workbench import signals, sources
from workbench.checkpoints import CheckpointDir
from workbench.config import config_hash

if TYPE_CHECKING:
    from collections.abc import Callable

    from workbench.callbacks import ReportFn
    from workbench.outbox import Outbox
    from workbench.train import Result, RunContext

PROGRESS = "cv.json"
NOT_SUMMARISED = ("learning_rate", "parameters")  # the same for every fold, or not a result


@dataclass
class Progress:
    """`cv.json` in the CV run's checkpoint folder."""

    run_id: str | None = None  # the CV run
    name: str | None = None  # its name, which the folds' runs extend (`<name>-fold-<i>`)
    folds: dict[str, dict[str, float]] = field(default_factory=dict)  # fold (from 1) -> its last epoch's metrics
    running: str | None = None  # the run of the fold in training, for a retry to end if its worker dies

    @classmethod
    def load(cls, folder: Path) -> Progress:
        return cls(**json.loads((folder / PROGRESS).read_text()))

    def save(self, folder: Path) -> None:
        tmp = folder / f".{PROGRESS}.tmp"
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, folder / PROGRESS)


def cross_validate(
    cfg: DictConfig,
    context: RunContext,
    source: sources.Source,
    size: int,
    report: ReportFn | None,
    parent_run_id: str | None,
    tags: dict[str, str] | None,
    on_run_start: Callable[[str], None] | None,
) -> Result:
    """What `workbench.train` does with `trainer.cv_folds` set (its arguments, the source loaded)."""
    from workbench import tracking
    from workbench.train import Result, checkpoint_dir, log_config

    k = cfg.trainer.cv_folds
    folds = sources.folds(source, k)  # refused here, before any store exists, when a class is too small
    for fold in folds:
        sources.check_batch_size(fold, cfg.trainer.batch_size)
    root = CheckpointDir(checkpoint_dir(cfg))
    with root.in_use():
        progress = _start(root.path, cfg.trainer.resume)
        experiment_id = tracking.configure(cfg.tracking)
        run_tags = (
            tracking.run_tags(cfg, context.choices, context.overrides, config_hash(cfg))
            | (tags or {})
            | {"workbench.kind": "cv", "cv_folds": str(k)}
        )
        progress.name = progress.name or tracking.run_name(cfg.tracking, run_tags) or "cv"
        with tracking.run(
            # The folds' runs sample the system metrics; the CV run, which waits on them, need not.
            cast(DictConfig, OmegaConf.merge(cfg.tracking, {"run_name": progress.name, "system_metrics": False})),
            experiment_id,
            root.path.parent,
            run_id=progress.run_id,
            parent_run_id=parent_run_id,
            tags=run_tags,
        ) as box:
            if on_run_start is not None:
                on_run_start(box.run_id)
            if progress.run_id is None:
                log_config(cfg, context)
                tracking.log_dataset(source.name, source.uri, source.digest)
                tracking.log_class_names(source.class_names)
                for carried, metrics in progress.folds.items():  # from a dead worker's attempt
                    box.metrics(_prefixed("fold_", metrics), int(carried))
                progress.run_id = box.run_id
                progress.save(root.path)
            for number, fold in enumerate(folds, 1):
                done = progress.folds.get(str(number))
                metrics = (
                    done
                    if done is not None
                    else _train_fold(cfg, context, fold, size, root.path, number, box, progress)
                )
                if report is not None:
                    with signals.held():
                        if report(number, metrics):
                            break
            finished = list(progress.folds.values())
            means, summary = summarise(finished)
            box.metrics(summary, len(finished))
        return Result(box.run_id, means, unsent=box.pending() > 0)


def _train_fold(
    cfg: DictConfig,
    context: RunContext,
    fold: sources.Source,
    size: int,
    root: Path,
    number: int,
    box: Outbox,
    progress: Progress,
) -> dict[str, float]:
    """Train fold `number` (from its epoch checkpoint, when it has one) as a child run of the CV run."""
    from workbench.train import train_one

    folder = root / f"fold-{number}"
    settings = {"trainer": {"checkpoint_dir": str(folder)}, "tracking": {"run_name": f"{progress.name}-fold-{number}"}}
    fold_cfg = cast(DictConfig, OmegaConf.merge(cfg, settings))  # a DictConfig merged with a mapping
    tags = {"workbench.kind": "cv_fold", "cv_fold": str(number), "cv_folds": str(cfg.trainer.cv_folds)}

    def running(run_id: str) -> None:
        progress.running = run_id
        progress.save(root)

    result = train_one(
        fold_cfg, context, fold, size, CheckpointDir(folder), root.parent, None, box.run_id, tags, running
    )
    with signals.held():  # logged, then recorded: a stop in between logs the fold twice, which is harmless
        box.metrics(_prefixed("fold_", result.metrics), number)
        progress.folds[str(number)], progress.running = result.metrics, None
        progress.save(root)
    return result.metrics


def summarise(folds: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """The result (each metric's mean over folds; `parameters` as it is) and the CV run's summary metrics
    (`cv_<metric>_mean` and `cv_<metric>_std`, NumPy's population standard deviation, as sklearn users
    print `scores.std()`)."""
    keys = [key for key in folds[0] if key not in NOT_SUMMARISED and all(key in fold for fold in folds)]
    means = {key: float(np.mean([fold[key] for fold in folds])) for key in keys}
    summary = {f"cv_{key}_mean": value for key, value in means.items()}
    summary |= {f"cv_{key}_std": float(np.std([fold[key] for fold in folds])) for key in keys}
    if "parameters" in folds[0]:
        means["parameters"] = folds[0]["parameters"]
    return means, summary


def is_cv_folder(path: Path) -> bool:
    return (path / PROGRESS).is_file()


def folds_done(path: Path) -> int:
    """How many folds of the CV run in checkpoint folder `path` have finished (0 without one)."""
    return len(Progress.load(path).folds) if is_cv_folder(path) else 0


def take_over(source: Path, target: Path, tracking_uri: str, why: str) -> int:
    """Move a dead attempt's CV checkpoint folder to `target`, for its retry: the finished folds are kept
    (the retry's new CV run logs them and trains only the rest) and the fold in progress goes on from its
    epoch checkpoint in a new run, once the dead attempt's run of that fold is ended KILLED. Returns the
    number of finished folds."""
    from workbench.outbox import end_abandoned

    shutil.copytree(source, target, dirs_exist_ok=True)
    shutil.rmtree(source)
    progress = Progress.load(target)
    if progress.running:
        end_abandoned(target.parent, progress.running, tracking_uri, {"workbench.stopped": why})
    for fold in target.glob("fold-*"):  # the fold in progress goes on in a new run of the new CV run
        ckpt = CheckpointDir(fold)
        if ckpt.state_file.is_file():
            state = ckpt.read_state()
            state.run_id = None
            ckpt.write_state(state)
    progress.run_id, progress.running = None, None
    progress.save(target)
    return len(progress.folds)


def _start(path: Path, resume: bool) -> Progress:
    """The CV run's progress to go on from (trainer.resume=true), else a clean folder."""
    if resume and is_cv_folder(path):
        return Progress.load(path)
    (path / PROGRESS).unlink(missing_ok=True)
    for fold in path.glob("fold-*"):
        shutil.rmtree(fold)
    return Progress()


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{key}": value for key, value in metrics.items() if key not in NOT_SUMMARISED}
