"""A user's own images end to end, each step a command as the README gives it: build records, train on
them, fine-tune from that run (frozen backbone, then unfrozen), evaluate with 1 and 10 crops, predict by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlflow.tracking import MlflowClient

from helpers import TINY, odd_image_folder, run_cli, tracking_uri, workbench_cli

CLASSES = ("cat", "dog", "fox")


def _ok(result) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def _run_id(stdout: str) -> str:
    match = re.search(r"Run ([0-9a-f]{32}) FINISHED", stdout)
    assert match, stdout[-2000:]
    return match.group(1)


def test_build_train_fine_tune_evaluate_and_predict(tmp_path: Path) -> None:
    src = odd_image_folder(tmp_path / "my photos", CLASSES, 10, "dog/broken 1.jpg")
    records = tmp_path / "my records"
    _ok(workbench_cli(["data", "build", str(src), str(records)], cwd=tmp_path))

    data = ["data=tfrecord", f"data.path={records}", "model=small_cnn", *TINY, "trainer.batch_size=8"]
    first = _run_id(_ok(run_cli([*data, "tracking.checkpoints=best"], tmp_path)))
    tuned = _run_id(
        _ok(
            run_cli(
                [*data, f"model.weights=runs:/{first}", "model.freeze=backbone", "trainer.freeze_epochs=1"],
                tmp_path,
            )
        )
    )

    client = MlflowClient(tracking_uri(tmp_path))
    # The run on records names its data as the build does: the source's digest, the labels, the skipped file.
    run = client.get_run(first)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == json.loads((records / "manifest.json").read_text())["source_digest"]
    labels = Path(client.download_artifacts(first, "labels.txt", str(tmp_path)))
    assert labels.read_text(encoding="utf-8") == "cat\ndog\nfox\n" == (records / "labels.txt").read_text()
    skipped = Path(client.download_artifacts(first, "skipped_files.txt", str(tmp_path)))
    assert "broken 1.jpg" in skipped.read_text(encoding="utf-8")

    params = client.get_run(tuned).data.params
    assert params["model.weights"] == f"runs:/{first}" and params["trainer.freeze_epochs"] == "1"

    own = _ok(workbench_cli(["eval", tuned], cwd=tmp_path))
    assert "precision@1" in own, own
    folder = _ok(workbench_cli(["eval", tuned, "--crops", "10", "data=image_folder", f"data.path={src}"], tmp_path))
    assert "recall@5" in folder, folder
    run = client.get_run(tuned)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert 0.0 <= metrics["eval_val_top1"] <= 1.0
    # Every readable image of the folder (the corrupt one skipped), each seen as 10 crops.
    assert metrics["eval_my_photos_10crop_examples"] == 3 * 10

    predicted = _ok(workbench_cli(["predict", tuned, str(src / "fox"), "--top", "2"], cwd=tmp_path))
    lines = predicted.strip().splitlines()
    assert len(lines) == 10, predicted
    assert all(sum(name in line for name in CLASSES) == 2 for line in lines), predicted
