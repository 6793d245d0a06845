"""`python run.py` end to end: the default job, what MLflow records, final statuses and secrets."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from helpers import ROOT, TINY, run_cli, tracking_uri

EPOCH_METRICS = {
    "loss",
    "accuracy",
    "top5_accuracy",
    "val_loss",
    "val_accuracy",
    "val_top5_accuracy",
    "learning_rate",
    "epoch_seconds",
    "images_per_second",
}


def _runs(cwd: Path):
    client = MlflowClient(tracking_uri(cwd))
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_default_job_learns_digits_and_records_everything(workdir: Path) -> None:
    result = run_cli([], cwd=workdir)
    assert result.returncode == 0, result.stderr
    client, runs = _runs(workdir)
    assert len(runs) == 1
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_accuracy"] >= 0.95

    # The closing summary: run id, metrics and the command that opens the UI on this store.
    assert f"Run {run_id} FINISHED" in result.stdout
    assert f"mlflow ui --backend-store-uri {tracking_uri(workdir)}" in result.stdout
    # ... and, past MLflow 3's GenAI overview, straight to the runs table, where the run has a readable name.
    assert f"#/experiments/{run.info.experiment_id}/runs" in result.stdout
    assert run.info.run_name.startswith("small_cnn-adam-"), run.info.run_name

    params = run.data.params
    assert params["model.name"] == "small_cnn" and params["optimizer.learning_rate"] == "0.001"
    assert params["trainer.epochs"] == "10" and "trainer.resume" not in params
    tags = run.data.tags
    assert (tags["model"], tags["optimizer"], tags["schedule"], tags["recipe"]) == (
        "small_cnn",
        "adam",
        "cosine",
        "none",
    )

    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, 11)), key
    assert run.data.metrics["parameters"] > 0
    # System metrics, on by default, every 10 s and once at the end (this machine has no GPU).
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) >= 2 and steps == sorted(steps), (key, steps)
    assert not [key for key in run.data.metrics if key.startswith("system/gpu")]

    artifacts = _artifacts(client, run_id)
    assert {
        "config/config.yaml",
        "config/hydra.yaml",
        "config/overrides.yaml",
        "checkpoints/best.keras",
        "checkpoints/last.keras",
        "training_curves.png",
        "labels.txt",
    } <= artifacts
    assert run.inputs.dataset_inputs[0].dataset.name == "digits"
    # The class names in output order, with the run and with its model, and how to feed the model.
    labels = client.download_artifacts(run_id, "labels.txt", str(workdir))
    assert Path(labels).read_text().splitlines() == [str(digit) for digit in range(10)]
    metadata = mlflow.models.get_model_info(f"runs:/{run_id}/model").metadata
    assert metadata["class_names"] == [str(digit) for digit in range(10)] and metadata["input_size"] == 32
    assert metadata["architecture"] == "small_cnn" and "divided by 255" in metadata["preprocessing"]

    model = mlflow.keras.load_model(f"runs:/{run_id}/model")
    images = np.zeros((2, 32, 32, 3), np.float32)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (2, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_overrides_and_git_commit_are_tagged(workdir: Path) -> None:
    result = run_cli([*TINY, "optimizer=momentum", "schedule=exponential", "tracking.log_model=false"], cwd=workdir)
    assert result.returncode == 0, result.stderr
    _, (run,) = _runs(workdir)
    assert run.data.tags["optimizer"] == "momentum"
    assert "optimizer=momentum" in run.data.tags["overrides"]
    assert run.data.params["optimizer.momentum"] == "0.9"
    if (ROOT / ".git").exists():
        assert len(run.data.tags.get("mlflow.source.git.commit", "")) == 40


def test_secrets_never_reach_mlflow_or_the_console(workdir: Path) -> None:
    secret = "hunter2-s3cr3t"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    # Keys the schema knows (unknown ones are refused): a URL with a password among the run's tags, and a
    # secret-named value in the job's environment (Hydra's env_set), which the overrides tag and the
    # config artifacts carry.
    result = run_cli(
        [
            *TINY,
            "tracking.log_model=false",
            f"tracking.tags={{db_url: 'postgresql://wb:{secret}@db/optuna', api_token: {secret}}}",
            f"+hydra.job.env_set.API_TOKEN={secret}",
            f"tracking.uri={uri}",
        ],
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    _, (run,) = _runs(workdir)
    assert run.data.params["tracking.tags.db_url"] == "postgresql://wb:***@db/optuna"
    assert run.data.tags["db_url"] == "postgresql://wb:***@db/optuna" and run.data.tags["api_token"] == "***"
    assert secret not in str(run.data.params) + str(run.data.tags)
    local = Path(run.info.artifact_uri.removeprefix("file://"))
    for path in local.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".txt", ".json"):
            assert secret not in path.read_text(errors="ignore"), path
    assert "API_TOKEN: '***'" in (local / "config" / "hydra.yaml").read_text()  # redacted, not dropped


def test_a_failing_run_ends_failed_with_the_reason(workdir: Path) -> None:
    # A learning rate this large makes the loss diverge: the run must end FAILED, not RUNNING.
    result = run_cli(
        [
            *TINY,
            "optimizer=momentum",
            "optimizer.learning_rate=1.0e+12",
            "trainer.epochs=3",
            "tracking.log_model=false",
        ],
        cwd=workdir,
    )
    assert result.returncode != 0
    _, (run,) = _runs(workdir)
    assert run.info.status == "FAILED"
    assert "Diverged" in run.data.tags["workbench.error"]
