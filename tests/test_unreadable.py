"""Files that will not decode are found when the folder is scanned: counted, named, never trained on; a
folder that cannot make a classifier (one class, a class of broken files, fewer images than a batch) is
refused before anything is written."""

from __future__ import annotations

import io
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import compose_config, corrupt_jpeg, jpeg_bytes, run_cli, truncated_jpeg
from workbench import readable, sources


@pytest.fixture
def scan_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The scan's cache in this test's folder, not the user's (the CLI inherits the variable)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def image_bytes(mode: str, fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def write_png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(10, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def test_the_scan_agrees_with_tensorflow(tmp_path: Path) -> None:
    """What the scan keeps, tf.io.decode_image decodes; what it skips, decode_image refuses."""
    import tensorflow as tf

    png = image_bytes("RGB", "PNG")
    files = {
        "rgb.jpg": jpeg_bytes(0),
        "grey.jpg": image_bytes("L", "JPEG"),
        "cmyk.jpg": image_bytes("CMYK", "JPEG"),
        "rgba.png": image_bytes("RGBA", "PNG"),
        "palette.png": image_bytes("P", "PNG"),
        "rgb.gif": image_bytes("RGB", "GIF"),
        "rgb.bmp": image_bytes("RGB", "BMP"),
        "grey.bmp": image_bytes("L", "BMP"),
        "truncated.jpg": truncated_jpeg(0),
        "corrupt body.jpg": corrupt_jpeg(0),
        "truncated.png": png[: len(png) // 2],
        "one bit.bmp": image_bytes("1", "BMP"),  # Pillow reads it; TensorFlow's BMP decoder does not
        "garbage.jpg": b"not an image at all" * 10,
    }
    decoded = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        try:
            tf.io.decode_image(data, channels=3, expand_animations=False)
            decoded[name] = True
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
            decoded[name] = False
    kept = {name: readable.why_unreadable(tmp_path / name) is None for name in files}
    assert kept == decoded
    assert sum(kept.values()) == 8  # the check is not vacuous: both answers occur


def test_each_split_folder_counts_its_skipped_files_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "images"
    for split, n in (("train", 3), ("val", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                write_png(root / split / c / f"{i}.png", seed=i)
    (root / "train" / "cat" / "t1.jpg").write_bytes(truncated_jpeg(1))
    (root / "train" / "dog" / "t2.jpg").write_bytes(corrupt_jpeg(2))
    (root / "val" / "dog" / "v1.jpg").write_bytes(truncated_jpeg(3))
    with caplog.at_level(logging.WARNING, logger="workbench.sources"):
        source = sources.load(compose_config(["data=image_folder", f"data.path={root}"]).data, 16)
    lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    tail = "each is named, with the reason, in the run's skipped_files.txt"
    assert lines == [
        f"Skipped 2 unreadable image file(s) of 8 in {root / 'train'}; {tail}",
        f"Skipped 1 unreadable image file(s) of 5 in {root / 'val'}; {tail}",
    ]
    assert (len(source.train), len(source.val)) == (6, 4)
    text = sources.skipped_files_text(source)
    assert [line.split("\t")[0] for line in text.splitlines()] == [
        str(root / "train" / "cat" / "t1.jpg"),
        str(root / "train" / "dog" / "t2.jpg"),
        str(root / "val" / "dog" / "v1.jpg"),
    ]
    assert all(line.split("\t")[1].startswith("cannot decode") for line in text.splitlines())


def test_a_second_scan_reuses_the_answers_of_unchanged_files(tmp_path: Path, scan_cache: Path) -> None:
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(jpeg_bytes(0))
    bad.write_bytes(truncated_jpeg(0))
    first = readable.check(tmp_path, [good, bad])
    assert first[good] is None and "truncated" in str(first[bad]).lower()
    assert readable.check(tmp_path, [bad]) == {bad: first[bad]}
    assert list(scan_cache.rglob("*.json"))

    # Same size and modification time: the cached answer stands (proof that the file is not decoded again).
    st = good.stat()
    data = bytearray(good.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 100] = b"\xff" * 100
    good.write_bytes(bytes(data))
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert readable.check(tmp_path, [good])[good] is None

    # A changed modification time: checked again.
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert readable.check(tmp_path, [good])[good] is not None


# --- refusals, through the CLI --------------------------------------------------------------------------------


def refused(args: list[str], cwd: Path) -> str:
    """The one error line of a refused command, which wrote no MLflow store and no checkpoint."""
    result: subprocess.CompletedProcess = run_cli(args, cwd=cwd, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not (cwd / "mlflow.db").exists() and not (cwd / "checkpoints").exists()
    return lines[0]


def test_a_class_of_only_broken_images_is_refused(workdir: Path) -> None:
    root = workdir / "images"
    write_png(root / "cat" / "1.png")
    (root / "dog").mkdir()
    (root / "dog" / "truncated.jpg").write_bytes(truncated_jpeg(0))
    (root / "dog" / "corrupt.jpg").write_bytes(corrupt_jpeg(1))
    line = refused(["data=image_folder", f"data.path={root}"], workdir)
    assert line.startswith(f"error: {root / 'dog'}: class folder has no readable image (JPEG, PNG, GIF or BMP)"), line
    assert "2 file(s) that do not decode" in line, line


@pytest.mark.parametrize("batch", ["32", "2"])  # larger than the training set, and small enough to train
def test_a_single_class_folder_is_refused(workdir: Path, batch: str) -> None:
    root = workdir / "images"
    for i in range(5):
        write_png(root / "cat" / f"{i}.png", seed=i)
    line = refused(["data=image_folder", f"data.path={root}", f"trainer.batch_size={batch}"], workdir)
    assert line == f"error: data.path={root}: one class folder (cat); a classifier needs at least two"


def test_a_batch_larger_than_the_training_set_is_refused(workdir: Path) -> None:
    root = workdir / "images"
    for c in ("cat", "dog"):
        for i in range(5):
            write_png(root / c / f"{i}.png", seed=i)
    line = refused(["data=image_folder", f"data.path={root}", "trainer.batch_size=32"], workdir)
    assert line == "error: trainer.batch_size=32: larger than the 8 training images"
