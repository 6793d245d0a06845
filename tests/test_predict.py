"""`workbench predict`: a trained run's model names the classes of raw image files."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import run_cli, tracking_uri, workbench_cli

COLOURS = {"blue": (30, 40, 210), "green": (30, 200, 40), "red": (220, 30, 30)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A folder of noisy solid-colour images (odd sizes and extensions, one grayscale) and a run trained on it."""
    cwd = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        for i in range(10):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (18 + i, 24, 3)), 0, 255).astype(np.uint8)
            path = cwd / "images" / name / f"{name} {i}.JPG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, format="JPEG")
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(cwd / "grey.png")
    args = ["data=image_folder", "data.path=images", "model.input_size=16", "trainer.epochs=4", "trainer.batch_size=8"]
    result = run_cli([*args, "optimizer.learning_rate=0.01", "tracking.checkpoints=none"], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result.stdout.split("\nRun ")[1].split()[0]


def test_predict_names_the_top_classes_as_the_model_computes_them(
    trained: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, run_id = trained
    (cwd / "images" / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    try:
        result = workbench_cli(["predict", run_id, "images/red", "grey.png", "--top", "2"], cwd)
    finally:
        (cwd / "images" / "red" / "broken.jpg").unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped images/red/broken.jpg" in result.stderr
    lines = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines()}
    files = [*sorted((cwd / "images" / "red").glob("*.JPG")), cwd / "grey.png"]
    assert sorted(lines) == sorted(str(f.relative_to(cwd)) for f in files)

    # The same numbers, computed as the model's metadata say the model is fed: RGB, resized, divided by 255.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(cwd))  # not set_tracking_uri: that outlives the test
    uri = f"runs:/{run_id}/model"
    metadata = mlflow.models.get_model_info(uri).metadata
    assert metadata["class_names"] == sorted(COLOURS)
    model = mlflow.keras.load_model(uri)
    for file in files:
        pixels = np.asarray(Image.open(file).convert("RGB"), np.float32)
        image = tf.image.resize(pixels, (metadata["input_size"], metadata["input_size"])) / 255.0
        row = model.predict(image[None], verbose=0)[0]
        top = np.argsort(-row)[:2]
        expected = "  ".join(f"{metadata['class_names'][i]} {row[i]:.3f}" for i in top)
        assert lines[str(file.relative_to(cwd))].split("  ", 1)[1].strip() == expected
    assert lines["images/red/red 0.JPG"].split()[2] == "red", "the colours are easy: a red image is red"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0123", "grey.png"], "error: 0123: not a run id or a model URI"),
        (["RUN", "missing.jpg"], "error: missing.jpg: no such file or folder"),
        (["0" * 32, "grey.png"], f"error: runs:/{'0' * 32}/model: no logged model there"),
        (["RUN", "grey.png", "--top", "0"], "error: --top 0: must be at least 1"),
    ],
    ids=["not-a-reference", "no-such-file", "no-such-run", "top-0"],
)
def test_bad_input_is_refused_in_one_line(trained: tuple[Path, str], args: list[str], message: str) -> None:
    cwd, run_id = trained
    result = workbench_cli([arg.replace("RUN", run_id) for arg in ["predict", *args]], cwd)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [result.stderr.strip()]
    assert result.stderr.startswith(message), result.stderr


def test_predict_where_no_store_is_creates_none(trained: tuple[Path, str], tmp_path: Path) -> None:
    cwd, run_id = trained
    result = workbench_cli(["predict", run_id, str(cwd / "grey.png")], tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: no mlflow.db here"), result.stderr
    assert list(tmp_path.iterdir()) == []
