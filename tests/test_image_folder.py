"""Image folders as users have them: odd names, nested folders, broken files, train/ and val/ siblings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import TINY, compose_config, corrupt_jpeg, run_cli, tracking_uri, truncated_jpeg
from workbench import sources

CLASSES = ("cat", "dog", "hérisson")


def write_image(path: Path, seed: int, fmt: str) -> None:
    """A small random RGB image (8 to 24 pixels a side) in the given format, whatever the suffix says."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(8, 25, size=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def odd_names(n: int) -> list[tuple[str, str]]:
    """n (relative file name, format) pairs, mixing letter cases, spaces, accents and a nested folder."""
    patterns = [
        ("chat été {i}.JPG", "JPEG"),
        ("img_{i}.jpeg", "JPEG"),
        ("IMG_{i}.PNG", "PNG"),
        ("photo {i}.jpg", "JPEG"),
        ("nested/deeper/{i}.png", "PNG"),
        ("ünïcødé_{i}.Jpg", "JPEG"),
    ]
    return [(patterns[i % len(patterns)][0].format(i=i), patterns[i % len(patterns)][1]) for i in range(n)]


def make_folder(root: Path, per_class: int = 12, reverse: bool = False) -> Path:
    """One sub-folder per class of odd-named images; `reverse` writes them in the opposite order."""
    for c, name in enumerate(CLASSES):
        files = odd_names(per_class)
        for i, (rel, fmt) in reversed(list(enumerate(files))) if reverse else enumerate(files):
            write_image(root / name / rel, seed=100 * c + i, fmt=fmt)
    return root


BROKEN = ("garbage.jpg", "truncated.jpg", "corrupt body.jpg")  # what add_broken_files writes that is skipped


def add_broken_files(root: Path) -> None:
    """Garbage named .jpg, a truncated JPEG and a JPEG with a corrupt body (all three skipped), and
    files that are no images (not counted)."""
    (root / "dog" / "garbage.jpg").write_bytes(b"\x00garbage, not an image\x00" * 40)
    (root / "cat" / "truncated.jpg").write_bytes(truncated_jpeg(1))
    (root / "hérisson" / "corrupt body.jpg").write_bytes(corrupt_jpeg(2))
    (root / "cat" / "notes.txt").write_text("not an image, not counted\n")
    (root / ".hidden").mkdir()  # not a class


def load(path: Path, *overrides: str) -> sources.Source:
    cfg = compose_config(["data=image_folder", f"data.path={path}", *overrides])
    return sources.load(cfg.data, 16)


def test_train_on_an_odd_image_folder(workdir: Path) -> None:
    folder = make_folder(workdir / "my images")
    add_broken_files(folder)
    result = run_cli(["data=image_folder", f"data.path={folder}", *TINY, "tracking.log_model=false"], cwd=workdir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # One line for the folder both splits come from, counting all three; libjpeg's messages stay off the console.
    skipped_lines = [line for line in output.splitlines() if "unreadable image file" in line]
    assert len(skipped_lines) == 1, output[-4000:]
    assert f"Skipped 3 unreadable image file(s) of 39 in {folder};" in skipped_lines[0], skipped_lines
    for noise in ("Input file read error", "Corrupt JPEG", "Premature end"):
        assert noise not in output, output[-4000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(workdir))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["data"] == "image_folder"
    assert "val_accuracy" in run.data.metrics
    # Three classes: every label is in the top 5, so top-5 accuracy would be a constant 1.0 and is not logged.
    assert not [key for key in run.data.metrics if "top5" in key], sorted(run.data.metrics)
    listed = client.download_artifacts(run.info.run_id, "skipped_files.txt", str(workdir))
    rows = [line.split("\t") for line in Path(listed).read_text(encoding="utf-8").splitlines()]
    assert sorted(Path(path).name for path, _ in rows) == sorted(BROKEN)
    assert all(Path(path).is_relative_to(folder) and why for path, why in rows), rows
    datasets = [d.dataset for d in run.inputs.dataset_inputs]
    assert len(datasets) == 1
    expected = load(folder)
    assert datasets[0].name == "my images"
    assert datasets[0].digest == expected.digest
    assert str(folder.resolve()) in datasets[0].source


def test_scan_finds_odd_names_and_skips_garbage(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "images")
    add_broken_files(folder)
    source = load(folder)
    assert source.class_names == sorted(CLASSES)
    files = source.train.files + source.val.files
    names = {Path(f).name for f in files}
    assert {"chat été 0.JPG", "img_1.jpeg", "IMG_2.PNG", "photo 3.jpg", "4.png", "ünïcødé_5.Jpg"} <= names
    assert any("/nested/deeper/" in f for f in files)
    # The truncated and the corrupt JPEG start like JPEGs: the scan decodes every file, so they are skipped here.
    assert not names & {*BROKEN, "notes.txt"}
    assert len(files) == 3 * 12
    assert sorted(Path(f).name for f, _ in source.skipped) == sorted(BROKEN)


def test_val_fraction_splits_each_class(tmp_path: Path) -> None:
    source = load(make_folder(tmp_path / "images", per_class=12), "data.val_fraction=0.25")
    for label in range(len(CLASSES)):
        assert np.sum(source.val.labels == label) == 3  # 25 % of 12, in every class
        assert np.sum(source.train.labels == label) == 9
    assert not set(source.train.files) & set(source.val.files)
    for split in (source.train, source.val):
        # Class by class, in path order: nothing depends on the order the file system lists files in.
        assert list(split.labels) == sorted(split.labels)
        assert split.files == sorted(split.files, key=lambda f: Path(f).parts)
    for files, labels in ((source.train.files, source.train.labels), (source.val.files, source.val.labels)):
        assert [Path(f).relative_to(tmp_path / "images").parts[0] for f in files] == [
            source.class_names[i] for i in labels
        ]


def test_val_fraction_split_is_stable(tmp_path: Path) -> None:
    """The same files give the same split: on every load, whatever order the files were written in."""

    def split(root: Path) -> tuple[list[str], list[str]]:
        source = load(root, "data.val_fraction=0.25")
        return [str(Path(f).relative_to(root)) for f in source.train.files], [
            str(Path(f).relative_to(root)) for f in source.val.files
        ]

    first = make_folder(tmp_path / "a")
    second = make_folder(tmp_path / "b", reverse=True)
    assert split(first) == split(first)
    assert split(first) == split(second)
    assert load(first).digest == load(first).digest


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_train_and_val_siblings(tmp_path: Path, val_name: str) -> None:
    root = tmp_path / "images"
    make_folder(root / "train", per_class=7)
    make_folder(root / val_name, per_class=2)
    (root / val_name / "dog" / "corrupt.jpg").write_bytes(b"not a jpeg at all" * 10)
    source = load(root, "data.val_fraction=0.5")  # ignored: the val folder is the validation set
    assert source.class_names == sorted(CLASSES)
    assert (len(source.train), len(source.val)) == (3 * 7, 3 * 2)
    assert all(Path(f).is_relative_to(root / "train") for f in source.train.files)
    assert all(Path(f).is_relative_to(root / val_name) for f in source.val.files)
    for label in range(len(CLASSES)):
        assert np.sum(source.train.labels == label) == 7 and np.sum(source.val.labels == label) == 2
    assert [source.class_names[i] for i in source.val.labels] == [
        Path(f).relative_to(root / val_name).parts[0] for f in source.val.files
    ]
