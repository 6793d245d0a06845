"""What `python run.py` does with a composed config: train, then say where the run is."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, cast

from hydra.types import RunMode
from omegaconf import DictConfig

from workbench.config import ConfigError

if TYPE_CHECKING:
    from workbench.train import RunContext

EXIT_USAGE = 2  # bad input, as argparse and Hydra's usage errors


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    """One line on stderr and exit status 2 (or `status`)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def main(cfg: DictConfig) -> float | int | None:
    """Train one config; print the run id, final metrics and how to open the MLflow UI. A study's
    worker jobs (launched by the study sweeper) run trials instead."""
    _pin_gpus(cfg)
    if cfg.get("study") is not None:
        return _study_worker(cfg)
    from workbench import signals
    from workbench.server import check_server
    from workbench.train import train  # MLflow and TensorFlow load inside, once the config and data pass

    try:
        with signals.stop_on_signals():
            check_server(cfg.tracking)
            result = train(cfg, _run_context())
    except ConfigError as exc:
        _discard_output_dir()
        fail(str(exc))
    except KeyboardInterrupt:  # the run has ended KILLED; say how to go on, without a traceback
        _stopped(cfg)
    metrics = result.metrics
    shown = {k: metrics[k] for k in sorted(metrics) if k.startswith(("val_", "accuracy", "loss"))}
    print(f"\nRun {result.run_id} FINISHED in experiment '{cfg.tracking.experiment}'")
    over = f"  (means over {cfg.trainer.cv_folds} folds: cv_*_mean, cv_*_std)" if cfg.trainer.cv_folds else ""
    print("  " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()) + over)
    if not result.unsent:  # else the store is away, as the warning above says
        from workbench import tracking

        print(f"  Compare runs: {tracking.ui_hint(result.run_id)}")
    return metrics.get(cfg.tracking.monitor)


def _stopped(cfg: DictConfig) -> NoReturn:
    """One line for a run that a signal stopped, and exit status 128 + signal (130 for Ctrl-C)."""
    import json
    import shlex

    from hydra.core.hydra_config import HydraConfig

    from workbench import signals
    from workbench.config import redact
    from workbench.train import checkpoint_dir

    signum = signals.received()
    name = signum.name if signum else "Ctrl-C"
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "trainer.resume"]
    folder = checkpoint_dir(cfg)
    again = " ".join(["python run.py", *(shlex.quote(redact(o)) for o in kept)])
    # state.json, read as such: workbench.checkpoints would import Keras for one number.
    state = folder / "state.json"
    done = json.loads(state.read_text())["epoch"] if state.is_file() else 0
    if cfg.trainer.cv_folds:
        from workbench import cv

        folds = f"{cv.folds_done(folder)} of {cfg.trainer.cv_folds} folds done"
        message = f"stopped by {name} with {folds}; continue with: {again} trainer.resume=true"
    elif done:
        message = (
            f"stopped by {name} after epoch {done} of {cfg.trainer.epochs}; continue with: {again} trainer.resume=true"
        )
    else:
        message = f"stopped by {name} before the first epoch ended; start again with: {again}"
    print(message, file=sys.stderr)
    raise SystemExit(signals.exit_status())


def _discard_output_dir() -> None:
    """A refused run leaves nothing: remove the folder Hydra made for this job (outputs/<date>/<time>, with
    its .hydra copies and log) and the date folder above it when that is left empty."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return  # a multirun's sweep folder holds its other jobs too
    output = Path(HydraConfig.get().runtime.output_dir)
    if output.resolve() == Path.cwd().resolve():
        return  # hydra.run.dir=. : the user's own folder
    shutil.rmtree(output, ignore_errors=True)
    for parent in (output.parent, output.parent.parent):
        if parent.resolve() == Path.cwd().resolve():
            break
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


def _run_context() -> RunContext:
    """This Hydra job's group choices, command-line overrides and .hydra folder, for the run to log."""
    from hydra.core.hydra_config import HydraConfig

    from workbench.train import RunContext

    if not HydraConfig.initialized():
        return RunContext()
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if v is not None}
    hydra_dir = Path(hc.runtime.output_dir) / hc.output_subdir if hc.output_subdir else None
    return RunContext(choices, list(hc.overrides.task), hydra_dir)


def _study_worker(cfg: DictConfig) -> int:
    if cfg.study.parent_run_id is None:  # set by the sweeper for the jobs it launches
        fail("a study runs its trials through the study sweeper: add --multirun (python run.py --multirun study=...)")
    from workbench.study.worker import run

    return run(cfg)


def _pin_gpus(cfg: DictConfig) -> None:
    """Give this job its own GPUs when parallel jobs share a machine (before TensorFlow sees any)."""
    from hydra.core.hydra_config import HydraConfig

    from workbench.devices import pin_local_gpus

    if HydraConfig.initialized():
        # A DictConfig at run time (the stub names the schema): `in` is False while job.num is MISSING.
        job = cast(DictConfig, HydraConfig.get().job)
        pin_local_gpus(cfg.trainer.gpus_per_job, job.num if "num" in job else 0)
