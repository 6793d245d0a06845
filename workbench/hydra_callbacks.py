"""Hydra callbacks the workbench registers in conf/config.yaml."""

from __future__ import annotations

import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class PrepareTracking(Callback):
    """Create the MLflow store and experiment once, in the launching process, before a multirun's jobs
    start: parallel jobs that each create a fresh SQLite store race on its schema. In each submitit job,
    record stop signals from the job's start (signals.record_early_stops)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "SUBMITIT_FOLDER" in os.environ:  # set by submitit in its jobs' processes
            from workbench import signals

            signals.record_early_stops()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from workbench.app import fail
        from workbench.config import ConfigError, validate_launcher

        try:
            # run.py checked this already; commands that bypass its check (--config-name...) meet it here,
            # still before any store or sweep folder exists.
            validate_launcher(config.hydra)
            if str(config.hydra.launcher.get("_target_", "")).endswith(".SlurmLauncher"):
                from workbench import slurm

                slurm.watch_quietly()
            # A study's sweeper does this itself, after it has checked the study: a refused study leaves nothing.
            if "tracking" in config and config.get("study") is None:
                from workbench import tracking
                from workbench.server import check_server

                check_server(config.tracking)
                tracking.configure(config.tracking)
        except ConfigError as exc:
            fail(str(exc))
