"""Sharded TFRecords: `workbench data build` from an odd image folder, training on them, exact resume, refusals."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import TINY, cli_env, compose_config, image_bytes, odd_image_folder, run_cli, workbench_cli

CLASSES = ("chat noir", "dog", "hérisson")
PER_CLASS = 8
CORRUPT = "dog/broken 1.jpg"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An image folder and its records, built by the CLI over what a stopped build would have left."""
    base = tmp_path_factory.mktemp("records")
    src, out = odd_image_folder(base / "my images", CLASSES, PER_CLASS, CORRUPT), base / "my records"
    out.mkdir()
    (out / "train-00000-of-00009").write_bytes(b"half a shard")  # a stopped build: shards, no manifest
    (out / ".train-00001-of-00009.tmp").write_bytes(b"half a shard")
    result = workbench_cli(["data", "build", str(src), str(out), "--images-per-shard", "8"], cwd=base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Skipped 1 unreadable image file(s)" in result.stdout, result.stdout
    return src, out


def read_records(path: Path) -> list[dict]:
    import tensorflow as tf

    examples = []
    for record in tf.data.TFRecordDataset(str(path)):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        examples.append(
            {key: (f.bytes_list.value or f.int64_list.value)[0] for key, f in feature.items()},
        )
    return examples


def test_build_writes_shards_labels_and_a_manifest(built: tuple[Path, Path]) -> None:
    src, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "labels.txt").read_text(encoding="utf-8") == "".join(f"{c}\n" for c in CLASSES)
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert train["count"] + val["count"] == 3 * PER_CLASS, "every readable image, the corrupt one skipped"
    assert [train["per_class"][c] + val["per_class"][c] for c in CLASSES] == [PER_CLASS] * 3
    assert train["shards"] == [f"train-{k:05d}-of-{len(train['shards']):05d}" for k in range(len(train["shards"]))]
    # The stopped build's leftovers are gone; only what the manifest lists (and the listing files) remain.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*train["shards"], *val["shards"], "labels.txt", "manifest.json", "skipped_files.txt"]
    )
    assert (out / "skipped_files.txt").read_text(encoding="utf-8").startswith(f"{src / CORRUPT}\t")
    assert manifest["skipped"] == 1 and manifest["images_per_shard"] == 8

    seen = []
    for split in (train, val):
        counts = {c: 0 for c in CLASSES}
        for shard in split["shards"]:
            examples = read_records(out / shard)
            assert len(examples) <= 8
            for example in examples:
                name = example["image/filename"].decode()
                text, label = example["image/class/text"].decode(), example["image/class/label"]
                assert CLASSES[label] == text == Path(name).parts[0], "labels from 0: no background class"
                assert example["image/encoded"] == (src / name).read_bytes(), "the file's bytes, not re-encoded"
                with Image.open(src / name) as image:
                    assert (example["image/width"], example["image/height"]) == image.size
                    assert example["image/format"].decode() == image.format
                counts[text] += 1
                seen.append(name)
        assert counts == split["per_class"]
    assert len(set(seen)) == len(seen) == 3 * PER_CLASS


def test_records_stream_like_the_folder_and_resume_exactly(built: tuple[Path, Path]) -> None:
    from workbench import data, models, sources

    src, out = built

    def pipelines(name: str, path: Path, initial_epoch: int = 0) -> tuple[sources.Source, data.Pipelines]:
        cfg = compose_config([f"data={name}", f"data.path={path}", "trainer.batch_size=4", "augmentation=flip_crop"])
        source = sources.load(cfg.data, 16)
        return source, data.build(source, cfg, 16, models.preprocessor(cfg.model.name), initial_epoch)

    folder, folder_pipes = pipelines("image_folder", src)
    records, pipes = pipelines("tfrecord", out)
    assert (records.class_names, records.digest) == (folder.class_names, folder.digest)
    assert (len(records.train), len(records.val)) == (len(folder.train), len(folder.val))
    # Validation: the same decode of the same images in the same order, batch for batch.
    for (x1, y1), (x2, y2) in zip(folder_pipes.val, pipes.val, strict=True):
        np.testing.assert_array_equal(x1.numpy(), x2.numpy())
        np.testing.assert_array_equal(y1.numpy(), y2.numpy())

    steps = pipes.steps_per_epoch
    whole = [(x.numpy(), y.numpy()) for x, y in pipes.train.take(3 * steps)]
    assert not np.array_equal(whole[0][0], whole[steps][0]), "each epoch is drawn afresh"
    labels = np.concatenate([y.argmax(1) for _, y in whole[:steps]])
    assert len(set(labels.tolist())) == len(CLASSES), "the classes are mixed within an epoch"
    _, resumed = pipelines("tfrecord", out, initial_epoch=2)
    for i, (x, y) in enumerate(resumed.train.take(steps)):
        np.testing.assert_array_equal(x.numpy(), whole[2 * steps + i][0])
        np.testing.assert_array_equal(y.numpy(), whole[2 * steps + i][1])


def test_a_stopped_build_leaves_no_manifest_and_no_half_shard(built: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = built
    out = tmp_path / "records"
    build = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "data", "build", str(src), str(out)],
        env=cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not out.exists() and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the folder appears once the scan is done, as the worker starts
    build.send_signal(signal.SIGINT)
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: stopped; {out} is unfinished"), stderr
    assert not (out / "manifest.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def one_line_refusal(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_source_that_is_not_an_image_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no class folders here\n")
    line = one_line_refusal(workbench_cli(["data", "build", "notes", "out"], cwd=tmp_path))
    assert "notes: empty; it needs one sub-folder of images per class" in line, line
    assert not (tmp_path / "out").exists()


def test_records_of_another_dataset_are_not_overwritten(built: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = built
    other = tmp_path / "other"
    for c, name in enumerate(("a", "b")):
        for i in range(3):
            (other / name).mkdir(parents=True, exist_ok=True)
            (other / name / f"{i}.jpg").write_bytes(image_bytes(c * 10 + i, "JPEG", "RGB"))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = one_line_refusal(workbench_cli(["data", "build", str(other), str(out)], cwd=tmp_path))
    assert f"{out}: holds records of another dataset" in line and "--overwrite" in line, line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize("missing", ["labels.txt", "manifest.json"])
def test_a_records_folder_without_its_listing_is_refused(built: tuple[Path, Path], workdir: Path, missing: str) -> None:
    _, out = built
    copy = shutil.copytree(out, workdir / "records")
    (copy / missing).unlink()
    result = run_cli(["data=tfrecord", f"data.path={copy}", *TINY], workdir, timeout=120)
    line = one_line_refusal(result)
    assert f"no {missing}" in line and "workbench data build SRC OUT" in line, line
    assert not (workdir / "mlflow.db").exists() and not (workdir / "checkpoints").exists()
