"""What `python run.py` does with a composed config: train, then say where the run is."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from workbench.config import ConfigError

EXIT_USAGE = 2  # bad input, as argparse and Hydra's usage errors


def fail(message: str, status: int = EXIT_USAGE) -> None:
    """One line on stderr and exit status 2 (or `status`)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def main(cfg: DictConfig) -> float | int | None:
    """Train one config; print the run id, final metrics and how to open the MLflow UI. A study's
    worker jobs (launched by the study sweeper) run trials instead."""
    _pin_gpus(cfg)
    if cfg.get("study") is not None:
        return _study_worker(cfg)
    from workbench import tracking
    from workbench.train import train

    try:
        tracking.check_server(cfg.tracking)
        metrics = train(cfg)
    except ConfigError as exc:
        fail(str(exc))
    import mlflow

    run = mlflow.last_active_run()
    shown = {k: metrics[k] for k in sorted(metrics) if k.startswith(("val_", "accuracy", "loss"))}
    print(f"\nRun {run.info.run_id} {run.info.status} in experiment '{cfg.tracking.experiment}'")
    print("  " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    print(f"  Compare runs: {tracking.ui_hint(run.info.run_id)}")
    return metrics.get(cfg.tracking.monitor)


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
        job = HydraConfig.get().job
        pin_local_gpus(cfg.trainer.gpus_per_job, job.num if "num" in job else 0)
