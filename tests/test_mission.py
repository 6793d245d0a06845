"""The mission command, `python run.py model=nasnet_large optimizer=momentum`, shrunk only by overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import run_cli, tracking_uri

# NASNetLarge at its smallest input on 2 CPU cores: most of the time is building and tracing its graph.
SHRINK = [
    "model.input_size=32",
    "trainer.epochs=1",
    "trainer.steps_per_epoch=1",
    "trainer.batch_size=4",
    "trainer.validation_steps=1",
    "tracking.log_model=false",
    "tracking.checkpoints=none",
]


@pytest.mark.slow
def test_nasnet_large_momentum(workdir: Path) -> None:
    result = run_cli(["model=nasnet_large", "optimizer=momentum", *SHRINK], cwd=workdir, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(tracking_uri(workdir))
    (run,) = client.search_runs([client.get_experiment_by_name("workbench").experiment_id])
    assert run.info.status == "FINISHED"
    assert (run.data.tags["model"], run.data.tags["optimizer"]) == ("nasnet_large", "momentum")
    params = run.data.params
    assert params["optimizer.name"] == "momentum" and params["optimizer.momentum"] == "0.9"
    assert params["model.jit_compile"] == "False"  # NASNet's XLA compile takes many minutes
    # keras.applications.NASNetLarge without its top: about 84.9 M parameters, plus a 10-class head.
    assert 84e6 < run.data.metrics["parameters"] < 86e6
    for key in ("loss", "accuracy", "val_accuracy", "val_top5_accuracy", "images_per_second"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1], key
    assert list(workdir.glob("checkpoints/*/last.keras")), "the local epoch checkpoint that resume needs"
