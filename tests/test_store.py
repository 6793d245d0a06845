"""The default MLflow store: created once, from a migrated empty copy, safely when processes start at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from helpers import cli_env, tracking_uri

CONFIGURE = """
import sys, time
from omegaconf import OmegaConf
from workbench import tracking
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # all start together: the race is the point
print(tracking.configure(OmegaConf.create({"uri": None, "experiment": "workbench"})))
"""


def test_processes_that_create_the_store_at_once_all_use_it(workdir: Path, tmp_path_factory) -> None:
    # A new cache too: the empty store they copy is made by one of them while the others wait.
    env = {**cli_env(), "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("fresh-cache"))}
    start = time.time() + 6
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", CONFIGURE, str(start)],
            cwd=workdir,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(4)
    ]
    outputs = [job.communicate(timeout=120)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0] * 4, outputs
    assert {out.strip().splitlines()[-1] for out in outputs} == {"1"}, outputs  # one experiment, the same id
    client = MlflowClient(tracking_uri(workdir))
    experiments = {e.name: e for e in client.search_experiments()}
    assert set(experiments) == {"Default", "workbench"}
    # Artifacts go beside this store, not beside the cached copy it was made from.
    for experiment in experiments.values():
        assert experiment.artifact_location.startswith(str(workdir)), experiment.artifact_location
