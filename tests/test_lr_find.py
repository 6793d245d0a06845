"""`workbench lr-find`, the learning-rate range test: a real ramp on digits with small_cnn, tracked in MLflow."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import run_cli, tracking_uri, workbench_cli

SUGGESTED = re.compile(r"^Suggested: optimizer\.learning_rate=(\S+)$", re.M)
RANGE = re.compile(r"^  optimizer\.learning_rate: \{type: float, low: (\S+), high: (\S+), log: true\}$", re.M)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory):
    """One range test over the default range, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("lr-find")
    result = workbench_cli(["lr-find", "model=small_cnn", "data=digits"], folder)
    assert result.returncode == 0, result.stderr
    return folder, result.stdout


def test_the_suggestion_trains_digits_to_095(probe: tuple[Path, str]) -> None:
    folder, output = probe
    found = SUGGESTED.search(output)
    assert found, output
    suggested = float(found.group(1))
    assert 1e-4 < suggested < 1.0, "Adam on small_cnn: the loss falls fastest well inside the ramp"
    low, high = (float(v) for v in RANGE.search(output).groups())  # type: ignore[union-attr]
    assert low < suggested < high
    # The default schedule (cosine), shortened to three epochs.
    trained = run_cli(["model=small_cnn", f"optimizer.learning_rate={found.group(1)}", "trainer.epochs=3"], folder)
    assert trained.returncode == 0, trained.stderr
    val_accuracy = float(re.search(r"\bval_accuracy=(\S+)", trained.stdout).group(1))  # type: ignore[union-attr]
    assert val_accuracy >= 0.95, trained.stdout


def test_the_probe_is_an_mlflow_run_with_its_curve(probe: tuple[Path, str]) -> None:
    folder, output = probe
    client = MlflowClient(tracking_uri(folder))
    (run,) = client.search_runs(["1"], "tags.`workbench.kind` = 'lr_find'")
    assert run.info.status == "FINISHED" and run.info.run_id in output
    steps = int(re.search(r"range test: (\d+) steps", output).group(1))  # type: ignore[union-attr]
    for key in ("lr_find_learning_rate", "lr_find_loss", "lr_find_smoothed_loss"):
        assert len(client.get_metric_history(run.info.run_id, key)) == steps, key
    rates = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "lr_find_learning_rate"), key=lambda m: m.step)
    ]
    assert rates[0] == pytest.approx(1e-7) and all(b > a for a, b in itertools.pairwise(rates))
    suggested = float(SUGGESTED.search(output).group(1))  # type: ignore[union-attr]
    assert run.data.metrics["suggested_learning_rate"] == pytest.approx(suggested, rel=1e-2)
    assert run.data.params["lr_find.steps"] == "100" and run.data.params["optimizer.name"] == "adam"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "lr_find")}
    assert files == {"lr_find/lr_find.png", "lr_find/lr_find.csv"}
    assert not any(client.list_artifacts(run.info.run_id, "checkpoints")), "a probe keeps no checkpoint"


def test_a_range_past_divergence_says_so_instead_of_suggesting(workdir: Path) -> None:
    result = workbench_cli(["lr-find", "model=small_cnn", "--min", "5", "--max", "100"], workdir)
    assert result.returncode == 1, result.stderr
    assert "Suggested" not in result.stdout
    assert "error: no suggestion: the loss did not fall" in result.stderr and "lower --min" in result.stderr
    (run,) = MlflowClient(tracking_uri(workdir)).search_runs(["1"])
    assert run.info.status == "FINISHED" and "workbench.lr_find" in run.data.tags


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min", "5", "--max", "1"], "error: --max 1: must be above --min 5"),
        (["--min", "0"], "error: --min 0: the lowest learning rate must be a number above 0"),
        (["--steps", "5"], "error: --steps 5: at least 14"),
        (["model=vgg16"], "error: model=vgg16: no such model; choose one of:"),
        (["trainer.batch_sise=8"], "error: trainer.batch_sise: no such key; did you mean trainer.batch_size?"),
        (["tracking.uri=http://127.0.0.1:9"], "error: tracking.uri=http://127.0.0.1:9: no MLflow server answers"),
    ],
    ids=["min-above-max", "min-zero", "steps", "model", "key", "no-server"],
)
def test_bad_input_is_refused_in_one_line(workdir: Path, args: list[str], message: str) -> None:
    result = workbench_cli(["lr-find", *args], workdir)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not list(workdir.iterdir()), "nothing written"
