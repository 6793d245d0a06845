"""Where the images come from: built-in digits, an image folder, its sharded TFRecords (records.py), or
synthetic tensors.

No TensorFlow here: a missing folder, a single class or a class with no image that decodes is refused
before any store or model exists. Every file of an image folder is decoded once when scanned (readable.py),
so the files the pipeline would fail on are skipped here: counted in the log, named in the run.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from workbench import readable
from workbench.config import ConfigError

log = logging.getLogger(__name__)

SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp"}
SPLIT_SEED = 0


@dataclass
class Split:
    """Images (an in-memory uint8 array, N x H x W x 3), image files, or TFRecord shards (records.py), with
    integer labels: one per example, in the order of the images, files or records."""

    labels: np.ndarray
    images: np.ndarray | None = None
    files: list[str] | None = None
    shards: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Source:
    name: str
    class_names: list[str]
    train: Split
    val: Split
    uri: str  # where the data lives, for MLflow's dataset record
    digest: str  # identifies the exact examples, for MLflow's dataset record
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of files that will not decode

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load(data_cfg: DictConfig, input_size: int) -> Source:
    """The configured source, split into training and validation examples.

    Splits use a fixed seed, not trainer.seed: a sweep over training seeds keeps one validation set.
    """
    return SOURCES[data_cfg.name](data_cfg, input_size)


def _digits(val_fraction: float) -> Source:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 8x8 grey levels 0..16 -> uint8 0..255, tiled to 3 channels; resized to the model's input in tf.data.
    images = np.repeat((digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, axis=-1)
    x_train, x_val, y_train, y_val = train_test_split(
        images, digits.target, test_size=val_fraction, random_state=SPLIT_SEED, stratify=digits.target
    )
    return Source(
        name="digits",
        class_names=[str(c) for c in digits.target_names],
        train=Split(labels=y_train.astype(np.int32), images=x_train),
        val=Split(labels=y_val.astype(np.int32), images=x_val),
        uri="sklearn.datasets.load_digits",
        digest=_digest(images.tobytes()),
    )


def _synthetic(data_cfg: DictConfig, input_size: int) -> Source:
    rng = np.random.default_rng(SPLIT_SEED)
    n = data_cfg.num_examples
    images = rng.integers(0, 256, size=(n, input_size, input_size, 3), dtype=np.uint8)
    labels = rng.integers(0, data_cfg.num_classes, size=n, dtype=np.int32)
    n_val = max(1, round(n * data_cfg.val_fraction))
    return Source(
        name="synthetic",
        class_names=[str(c) for c in range(data_cfg.num_classes)],
        train=Split(labels=labels[n_val:], images=images[n_val:]),
        val=Split(labels=labels[:n_val], images=images[:n_val]),
        uri=f"synthetic://{n}x{input_size}x{input_size}x3",
        digest=_digest(f"{n}-{input_size}-{data_cfg.num_classes}".encode()),
    )


def image_folder(path: str | None, val_fraction: float) -> Source:
    """An image folder as `data=image_folder` reads it, and `workbench data build` converts it."""
    root = Path(str(path)).expanduser() if path else None
    if root is None or not root.is_dir():
        raise ConfigError(f"data.path={path}: no such folder; give a folder with one sub-folder per class")
    train_root, val_root = root, None
    for name in ("val", "validation"):
        if (root / "train").is_dir() and (root / name).is_dir():
            train_root, val_root = root / "train", root / name
            break
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"data.path={path}: empty; it needs one sub-folder of images per class")
    if len(classes) == 1:
        raise ConfigError(f"data.path={path}: one class folder ({classes[0]}); a classifier needs at least two")

    # Every file of both splits is checked in one go: one pass of the thread pool, one cache per folder.
    candidates = {folder: _candidates(folder, classes) for folder in (train_root, val_root) if folder is not None}
    verdicts = readable.check(root, [f for per_class in candidates.values() for files in per_class for f in files])
    skipped: list[tuple[str, str]] = []
    train_files = _keep_readable(train_root, classes, candidates[train_root], verdicts, skipped)
    if val_root is not None:
        val_files = _keep_readable(val_root, classes, candidates[val_root], verdicts, skipped, required=False)
        train, val = _as_split(train_files), _as_split(val_files)
    else:
        train, val = _split_per_class(classes, train_files, val_fraction)
    if len(val) == 0:
        raise ConfigError(f"data.path={path}: no validation images; add a val/ folder or raise data.val_fraction")
    all_files = sorted(f for files in train_files for f in files)
    return Source(
        name=root.name,
        class_names=classes,
        train=train,
        val=val,
        uri=str(root.resolve()),
        digest=_digest("\n".join(all_files).encode()),
        skipped=skipped,
    )


def _candidates(root: Path, classes: list[str]) -> list[list[Path]]:
    """Files with an image suffix in each class folder, in a stable order."""
    return [
        [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in SUFFIXES and p.is_file()]
        if (folder := root / name).is_dir()
        else []
        for name in classes
    ]


def _keep_readable(
    root: Path,
    classes: list[str],
    candidates: list[list[Path]],
    verdicts: dict[Path, str | None],
    skipped: list[tuple[str, str]],
    required: bool = True,
) -> list[list[str]]:
    """The files of each class that will decode; the others go to `skipped` with their reason, and one
    log line counts them (per split folder: train/ and val/, or the one folder both splits come from)."""
    per_class, dropped = [], 0
    for name, files in zip(classes, candidates, strict=True):
        kept = [str(f) for f in files if verdicts[f] is None]
        bad = [(str(f), str(verdicts[f])) for f in files if verdicts[f] is not None]
        if required and not kept:
            why = f" ({len(bad)} file(s) that do not decode, e.g. {Path(bad[0][0]).name}: {bad[0][1]})" if bad else ""
            raise ConfigError(f"{root / name}: class folder has no readable image (JPEG, PNG, GIF or BMP){why}")
        skipped.extend(bad)
        dropped += len(bad)
        per_class.append(kept)
    if dropped:
        total = dropped + sum(len(files) for files in per_class)
        log.warning(
            "Skipped %d unreadable image file(s) of %d in %s; each is named, with the reason, in the run's "
            "skipped_files.txt",
            dropped,
            total,
            root,
        )
    return per_class


def _as_split(per_class: list[list[str]]) -> Split:
    files = [f for fs in per_class for f in fs]
    labels = np.array([c for c, fs in enumerate(per_class) for _ in fs], dtype=np.int32)
    return Split(labels=labels, files=files)


def _split_per_class(classes: list[str], per_class: list[list[str]], val_fraction: float) -> tuple[Split, Split]:
    train, val = [], []
    for name, files in zip(classes, per_class, strict=True):
        # One stream per class: adding images to one class leaves the other classes' splits alone.
        rng = np.random.default_rng([SPLIT_SEED, zlib.crc32(name.encode())])
        order = rng.permutation(len(files))
        n_val = round(len(files) * val_fraction) if len(files) > 1 else 0
        val.append([files[i] for i in sorted(order[:n_val])])
        train.append([files[i] for i in sorted(order[n_val:])])
    return _as_split(train), _as_split(val)


def spread(counts: list[int]) -> np.ndarray:
    """An order of the examples of each class, concatenated class by class, that spreads every class evenly
    over the whole sequence: the i-th of n examples of a class goes at fraction (i + 1/2) / n. Training
    records are written in this order, so every shard holds each class in proportion. Exact arithmetic on
    the counts only: the order can be recomputed from them, with any NumPy."""
    labels = np.repeat(np.arange(len(counts)), counts)
    within = np.concatenate([np.arange(n) for n in counts]) if counts else np.zeros(0, np.int64)
    sizes = np.asarray(counts, np.int64)[labels]
    # float64 division rounds correctly, so equal ratios tie (broken by class) on every machine.
    return np.lexsort((labels, (2 * within + 1) / (2 * sizes)))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def check_batch_size(source: Source, batch_size: int) -> None:
    """Refuse a batch larger than the training set: before any store, model or pipeline exists."""
    if len(source.train) < batch_size:
        raise ConfigError(f"trainer.batch_size={batch_size}: larger than the {len(source.train)} training images")


def folds(source: Source, k: int) -> list[Source]:
    """k stratified folds of the training split, each a Source that trains on the other k - 1 folds and
    validates on itself; the source's own validation split is left out, for the final check. The folds
    come from a fixed seed (like the validation split), so every trial and rerun of a study sees the same
    ones; ConfigError when a class has fewer than k examples."""
    from sklearn.model_selection import StratifiedKFold

    labels = source.train.labels
    counts = np.bincount(labels, minlength=source.num_classes)
    smallest = int(counts.argmin())
    if counts[smallest] < k:
        raise ConfigError(
            f"trainer.cv_folds={k}: class {source.class_names[smallest]} has {counts[smallest]} training "
            f"example(s), fewer than the folds; use at most {counts[smallest]} folds"
        )
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=SPLIT_SEED)
    return [
        replace(
            source, name=f"{source.name}-fold-{i}", train=_subset(source.train, rest), val=_subset(source.train, held)
        )
        for i, (rest, held) in enumerate(splitter.split(np.zeros(len(labels)), labels), 1)
    ]


def _subset(split: Split, indices: np.ndarray) -> Split:
    return Split(
        labels=split.labels[indices],
        images=None if split.images is None else split.images[indices],
        files=None if split.files is None else [split.files[i] for i in indices],
    )


def skipped_files_text(source: Source) -> str:
    """The run's skipped_files.txt: one unreadable file a line, its path and the reason, tab-separated."""
    return "".join(f"{path}\t{why}\n" for path, why in source.skipped)


def _tfrecord(path: str | None) -> Source:
    from workbench import records  # here: records imports this module

    return records.source(path)


# The data sources, by the option name of their conf/data/<name>.yaml; config validation reads the names.
SOURCES: dict[str, Callable[[DictConfig, int], Source]] = {
    "digits": lambda data_cfg, size: _digits(data_cfg.val_fraction),
    "image_folder": lambda data_cfg, size: image_folder(data_cfg.path, data_cfg.val_fraction),
    "synthetic": _synthetic,
    "tfrecord": lambda data_cfg, size: _tfrecord(data_cfg.path),
}
