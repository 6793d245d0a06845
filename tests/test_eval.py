"""`workbench eval`: a trained run's model on its own validation split, on a held-out folder with 10 crops,
and as a bare checkpoint file; the numbers against scikit-learn's; bad input refused in one line."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient
from sklearn.metrics import precision_recall_fscore_support, top_k_accuracy_score

from helpers import TINY, compose_config, jpeg_bytes, tracking_uri, workbench_cli
from workbench import sources
from workbench.cli import main
from workbench.evaluate import ten_crops
from workbench.train import checkpoint_dir, train


class Trained(NamedTuple):
    folder: Path
    store: str
    run_id: str  # small_cnn on digits, with its model and checkpoints
    no_model: str  # a run trained with tracking.log_model=false
    checkpoint: Path  # the trainer's last.keras of `run_id`: the same weights as its logged model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """Two tiny runs, trained in-process once for the whole file (a subprocess would import TensorFlow again)."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    folder = tmp_path_factory.mktemp("eval")
    store = tracking_uri(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        # Training and in-process evals point MLflow's globals at this store: put them back afterwards.
        patch.setattr(utils, "_tracking_uri", utils._tracking_uri)
        patch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
        cfg = compose_config([*TINY, f"tracking.uri={store}"])
        run_id = train(cfg).run_id
        quiet = [*TINY, "trainer.epochs=1", "tracking.log_model=false", "tracking.checkpoints=none"]
        no_model = train(compose_config([*quiet, f"tracking.uri={store}"])).run_id
        yield Trained(folder, store, run_id, no_model, (checkpoint_dir(cfg) / "last.keras").resolve())


def run_eval(trained: Trained, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    main(["eval", *args, "--tracking-uri", trained.store])
    return capsys.readouterr().out


def all_runs(client: MlflowClient) -> list[mlflow.entities.Run]:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def downloaded(run_id: str, path: str, store: str, into: Path) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(into), tracking_uri=store)
    )


def test_the_run_own_validation_split_agrees_with_scikit_learn(
    trained: Trained, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = run_eval(trained, capsys, trained.run_id)
    assert "the run's own validation split of digits" in out and "top5 (recall@5)" in out, out

    client = MlflowClient(trained.store)
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED", "the run is written to, not resumed"
    metrics = run.data.metrics
    folder = downloaded(trained.run_id, "eval/val", trained.store, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "metrics.json",
        "per_class.csv",
    ]
    summary = json.loads((folder / "metrics.json").read_text())
    with (folder / "confusion_matrix.csv").open() as file:
        confusion = np.array([[int(c) for c in row[1:]] for row in list(csv.reader(file))[1:]])
    with (folder / "per_class.csv").open() as file:
        per_class = list(csv.DictReader(file))

    # The same examples validation saw: digits' fixed-seed split, all of it.
    cfg = compose_config(TINY)
    val = sources.load(cfg.data, 16).val
    assert metrics["eval_val_examples"] == summary["examples"] == len(val) == confusion.sum() == 360
    assert [row["class"] for row in per_class] == summary["class_names"] == [str(c) for c in range(10)]

    # Probabilities recomputed here, the model fed as its metadata say (resized, divided by 255), and
    # every number computed again by scikit-learn.
    model = mlflow.keras.load_model(f"runs:/{trained.run_id}/model")
    images = tf.image.resize(tf.cast(val.images, tf.float32), (16, 16)) / 255.0
    probabilities = model.predict(images, batch_size=64, verbose=0)
    classes = list(range(10))
    assert metrics["eval_val_top1"] == pytest.approx(
        top_k_accuracy_score(val.labels, probabilities, k=1, labels=classes)
    )
    assert metrics["eval_val_top5"] == pytest.approx(
        top_k_accuracy_score(val.labels, probabilities, k=5, labels=classes)
    )
    assert summary["precision@1"] == summary["top1"] == metrics["eval_val_top1"]
    assert summary["recall@5"] == summary["top5"] == metrics["eval_val_top5"]
    precision, recall, f1, support = precision_recall_fscore_support(
        val.labels, probabilities.argmax(axis=1), labels=classes, zero_division=0
    )
    for name, expected in (("precision", precision), ("recall", recall), ("f1", f1)):
        assert [float(row[name]) for row in per_class] == pytest.approx(expected, abs=1e-4), name
    assert [int(row["support"]) for row in per_class] == list(support) == list(confusion.sum(axis=1))
    assert np.trace(confusion) / confusion.sum() == pytest.approx(metrics["eval_val_top1"])


def test_ten_crops_are_the_corners_and_centre_of_the_resized_image_and_their_mirrors() -> None:
    # size 7: the shorter side is resized to round(7 / 0.875) = 8, which this 8 x 16 image already has.
    image = np.arange(8 * 16 * 3, dtype=np.uint8).reshape(8, 16, 3)
    crops = ten_crops(tf.constant(image), 7).numpy()
    pixels = image.astype(np.float32)
    expected = [pixels[:7, :7], pixels[:7, 9:], pixels[1:, :7], pixels[1:, 9:], pixels[0:7, 4:11]]
    assert crops.shape == (10, 7, 7, 3)
    for i, crop in enumerate(expected):
        np.testing.assert_allclose(crops[i], crop)
        np.testing.assert_allclose(crops[i + 5], crop[:, ::-1])


def test_ten_crops_on_a_held_out_folder_evaluates_all_its_images(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    holdout = trained.folder / "my holdout"
    for c in range(10):  # digits' class names; images of odd shapes, some upper-case suffixes
        for i in range(3):
            path = holdout / str(c) / f"{c}-{i}.{'JPG' if i else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(10 * c + i, size=12 + 5 * i))
    out = run_eval(trained, capsys, trained.run_id, "--crops", "10", "data=image_folder", f"data.path={holdout}")
    assert "10 crops an image" in out and "all of my holdout" in out, out
    run = MlflowClient(trained.store).get_run(trained.run_id)
    assert run.data.metrics["eval_my_holdout_10crop_examples"] == 30, "every image: training and validation splits"
    assert 0 <= run.data.metrics["eval_my_holdout_10crop_top1"] <= run.data.metrics["eval_my_holdout_10crop_top5"]
    assert run.info.status == "FINISHED"
    names = {a.path for a in MlflowClient(trained.store).list_artifacts(trained.run_id, "eval/my_holdout_10crop")}
    assert "eval/my_holdout_10crop/confusion_matrix.png" in names


def test_a_checkpoint_file_is_logged_to_a_new_run_tagged_with_its_path(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_eval(trained, capsys, str(trained.checkpoint))
    assert "Logged to a new run" in out, out
    new_run_id = out.split("Logged to a new run ")[1].split(":")[0]
    client = MlflowClient(trained.store)
    run = client.get_run(new_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["workbench.checkpoint"] == str(trained.checkpoint)
    # The default data's validation split; the checkpoint holds the logged model's weights.
    if "eval_val_top1" not in client.get_run(trained.run_id).data.metrics:
        run_eval(trained, capsys, trained.run_id)
    source = client.get_run(trained.run_id).data.metrics
    assert run.data.metrics["eval_digits_val_top1"] == pytest.approx(source["eval_val_top1"])
    assert run.data.metrics["eval_digits_val_examples"] == 360


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0" * 32], f"error: {'0' * 32}: no run {'0' * 32} in sqlite:"),
        (["RUN", "--crops", "7"], "error: --crops 7: must be 1"),
        (["NO_MODEL"], "error: runs:/NO_MODEL/model: no logged model there"),
        (["RUN", "data=digits", "data.path=x"], "error: data=digits data.path=x: these data overrides do not compose"),
        (["RUN", "data=synthetic", "data.num_classes=3"], "error: RUN: the model's classes (0, 1, 2, 3"),
        (["RUN", "model.name=resnet50"], "error: model.name=resnet50: only data overrides"),
    ],
    ids=["no-such-run", "crops-7", "no-model", "does-not-compose", "other-classes", "not-data"],
)
def test_bad_input_is_refused_in_one_line_and_writes_nothing(
    trained: Trained, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    def named(text: str) -> str:
        return text.replace("NO_MODEL", trained.no_model).replace("RUN", trained.run_id)

    client = MlflowClient(trained.store)
    before = {r.info.run_id: r.data.metrics for r in all_runs(client)}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["eval", *(named(a) for a in args), "--tracking-uri", trained.store])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()], err
    assert err.startswith(named(message)), err
    after = all_runs(client)
    assert all(r.info.status != "RUNNING" for r in after)
    assert {r.info.run_id: r.data.metrics for r in after} == before, "no run made, no metric logged"


def test_the_command_refuses_a_run_that_does_not_exist(trained: Trained) -> None:
    result = workbench_cli(["eval", "f" * 32, "--tracking-uri", trained.store], trained.folder)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {'f' * 32}: no run {'f' * 32} in {trained.store}", result.stderr
