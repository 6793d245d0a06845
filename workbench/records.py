"""Sharded TFRecords: `workbench data build SRC OUT` writes them from an image folder, `data=tfrecord` reads them.

OUT holds `train-00000-of-000NN` and `validation-00000-of-000NN` shards of about 1,024 examples, `labels.txt`
(class names in index order, one a line), `skipped_files.txt` and `manifest.json` (counts per class and
split, shard names, the source's digest). Each example keeps the file's encoded bytes as they are, under the
Inception script's feature names (build_image_data.py), but labels count from 0: no background class.
Training shards hold the classes spread evenly (sources.spread); validation shards keep the image folder's
order, so both sources validate on the same batches.

Writing is atomic: each shard is written under a temporary name and renamed when whole, and manifest.json
is removed first and written last, so a folder without it is an unfinished build that nothing reads.
No TensorFlow in this process: the worker processes write the shards, and reading a folder's manifest
(`source`) is plain JSON.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench import signals, sources
from workbench.config import ConfigError, first_line
from workbench.sources import Source, Split

if TYPE_CHECKING:
    import tensorflow as tf

FORMAT_VERSION = 1
IMAGES_PER_SHARD = 1024  # the Inception README's rule: shards of about 1,024 images
# Each worker process imports TensorFlow for its TFRecordWriter, about 4 s of CPU: by default a worker per
# this many images (and at most one per core), so a small folder is not written slower by more workers.
IMAGES_PER_WORKER = 2048
MANIFEST, LABELS, SKIPPED = "manifest.json", "labels.txt", "skipped_files.txt"
SPLITS = ("train", "validation")
# What a build writes, with the temporary names it writes them under.
_OURS = re.compile(r"^\.?((train|validation)-\d{5}-of-\d{5}|labels\.txt|skipped_files\.txt|manifest\.json)(\.tmp)?$")
_FIX = "workbench data build SRC OUT"


def build(
    src: str,
    out: str,
    val_fraction: float = 0.2,
    images_per_shard: int = IMAGES_PER_SHARD,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the records of image folder `src` into `out`; return the manifest. ConfigError on bad input,
    before anything is written."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {val_fraction}: must be in (0, 1)")
    if images_per_shard < 1:
        raise ConfigError(f"--images-per-shard {images_per_shard}: must be at least 1")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    root = Path(out).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{out}: a file, not a folder; give a new or empty folder for the records")
    if Path(src).expanduser().is_dir() and root.resolve().is_relative_to(Path(src).expanduser().resolve()):
        raise ConfigError(f"{out}: inside the image folder {src}, where it would read as a class; put it elsewhere")
    try:
        with _quiet(sources.log):  # the scan's warning speaks of a run; the CLI prints the count instead
            source = sources.image_folder(src, val_fraction)
    except ConfigError as exc:  # the scan's messages name the config keys; here they are SRC and a flag
        raise ConfigError(str(exc).replace("data.path=", "").replace("data.val_fraction", "--val-fraction")) from None
    _check_out(root, source.digest, overwrite)

    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # from here until the new one lands, the folder is unfinished
    splits = dict(zip(SPLITS, (source.train, source.val), strict=True))
    tasks = [task for name, split in splits.items() for task in _tasks(root, name, split, source, images_per_shard)]
    _write_shards(tasks, workers or max(1, min(_cores(), len(source.train) // IMAGES_PER_WORKER)))
    signals.check()  # no manifest after a stop, even one that landed as the last shard finished
    written = [Path(path).name for path, _ in tasks]
    for old in root.iterdir():  # what an earlier build left: shards of another count, a stopped one's .tmp files
        if _OURS.match(old.name) and old.name.startswith((".", *SPLITS)) and old.name not in written:
            old.unlink()
    _write_atomic(root / LABELS, "".join(f"{name}\n" for name in source.class_names))
    _write_atomic(root / SKIPPED, sources.skipped_files_text(source))
    manifest = {
        "format": FORMAT_VERSION,
        "source": source.uri,
        "source_digest": source.digest,
        "val_fraction": val_fraction,
        "images_per_shard": images_per_shard,
        "skipped": len(source.skipped),
        "splits": {
            name: {
                "count": len(split),
                "per_class": dict(zip(source.class_names, _counts(split, source.num_classes), strict=True)),
                "shards": [shard for shard in written if shard.startswith(f"{name}-")],
            }
            for name, split in splits.items()
        },
    }
    _write_atomic(root / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")  # last
    return manifest


def source(path: str | None) -> Source:
    """The records folder of `data=tfrecord`, from its manifest.json and labels.txt: no TensorFlow."""
    root = Path(str(path)).expanduser() if path else None
    if root is None or not root.is_dir():
        raise ConfigError(f"data.path={path}: no such folder; build records into it with: {_FIX}")
    for name in (MANIFEST, LABELS):
        if not (root / name).is_file():
            raise ConfigError(f"data.path={path}: no {name}; not a records folder, or its build did not finish: {_FIX}")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        splits = [manifest["splits"][name] for name in SPLITS]
        counts = [[int(n) for n in split["per_class"].values()] for split in splits]
        version = manifest["format"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{root / MANIFEST}: unreadable ({first_line(exc)}); rebuild it: {_FIX}") from None
    if version != FORMAT_VERSION:
        raise ConfigError(f"{root / MANIFEST}: format {version}, this workbench reads {FORMAT_VERSION}: {_FIX}")
    class_names = (root / LABELS).read_text(encoding="utf-8").splitlines()
    if len(class_names) != len(counts[0]):
        raise ConfigError(
            f"{root / LABELS}: {len(class_names)} names for {len(counts[0])} classes in {MANIFEST}; rebuild: {_FIX}"
        )
    for split in splits:
        missing = [name for name in split["shards"] if not (root / name).is_file()]
        if missing:
            raise ConfigError(f"{root / missing[0]}: missing, listed in {MANIFEST}; rebuild: {_FIX}")
    # Labels in record order: training shards were written in sources.spread's order, validation in class order.
    train_labels = np.repeat(np.arange(len(counts[0])), counts[0])[sources.spread(counts[0])]
    val_labels = np.repeat(np.arange(len(counts[1])), counts[1])
    train, val = (
        Split(labels=labels.astype(np.int32), shards=[str(root / shard) for shard in split["shards"]])
        for labels, split in zip((train_labels, val_labels), splits, strict=True)
    )
    skipped = (root / SKIPPED).read_text(encoding="utf-8").splitlines() if (root / SKIPPED).is_file() else []
    return Source(
        name=root.name,
        class_names=class_names,
        train=train,
        val=val,
        uri=str(root.resolve()),
        digest=str(manifest["source_digest"]),
        skipped=[(file, why) for file, _, why in (line.partition("\t") for line in skipped)],  # the run names them too
    )


def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A serialized example -> (encoded image bytes, integer label)."""
    import tensorflow as tf

    features = tf.io.parse_single_example(
        record,
        {
            "image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        },
    )
    return features["image/encoded"], features["image/class/label"]


# --- writing ---------------------------------------------------------------------------------------------

Example = tuple[str, int, str, Path]  # file, label, class name, the image folder (file names are relative to it)


def _tasks(root: Path, name: str, split: Split, source: Source, per_shard: int) -> list[tuple[str, list[Example]]]:
    """The split's shards: (path, examples) each. Training shards spread the classes evenly (sources.spread),
    validation shards keep the image folder's order."""
    assert split.files is not None
    files, labels = split.files, split.labels
    order = sources.spread(_counts(split, source.num_classes)) if name == "train" else np.arange(len(split))
    examples = [(files[i], int(labels[i]), source.class_names[labels[i]], Path(source.uri)) for i in order]
    count = max(1, math.ceil(len(examples) / per_shard))
    parts = np.array_split(np.arange(len(examples)), count)
    return [(str(root / f"{name}-{k:05d}-of-{count:05d}"), [examples[i] for i in part]) for k, part in enumerate(parts)]


def _counts(split: Split, num_classes: int) -> list[int]:
    return np.bincount(split.labels, minlength=num_classes).tolist()


def _write_shards(tasks: list[tuple[str, list[Example]]], workers: int) -> None:
    from tqdm import tqdm  # type: ignore[import-untyped]  # installed with Optuna

    total = sum(len(examples) for _, examples in tasks)
    # multiprocessing.Pool, not concurrent.futures: Ctrl-C must stop the workers at once (terminate), and
    # spawned workers start clean whatever this process holds (threads of the scan, a progress bar).
    context = multiprocessing.get_context("spawn")
    pool = None
    try:
        with signals.held():  # a stop while a worker is spawned would cut its start-up data short (a traceback)
            pool = context.Pool(min(workers, len(tasks)), initializer=_start_worker)
        with tqdm(total=total, unit="img", desc="Writing shards", file=sys.stderr) as bar:
            for count in pool.imap_unordered(_write_shard, tasks):
                bar.update(count)
                signals.check()  # a stop whose KeyboardInterrupt Python swallowed (in a __del__)
        pool.close()
        pool.join()
    except BaseException:  # Ctrl-C at any point, the pool's start included
        if pool is not None:
            pool.terminate()  # a worker killed mid-shard leaves only its .tmp file, removed below
            pool.join()
        for path, _ in tasks:
            _tmp(Path(path)).unlink(missing_ok=True)
        raise


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it terminates the pool
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:  # TensorFlow's start-up chatter, once per worker
        os.dup2(devnull.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _write_shard(task: tuple[str, list[Example]]) -> int:
    import tensorflow as tf

    path, examples = Path(task[0]), task[1]
    tmp = _tmp(path)
    try:
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for example in examples:
                writer.write(_example(*example).SerializeToString())
        os.replace(tmp, path)  # whole, or not there
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{exc.filename or path}: {exc.strerror or first_line(exc)}; run the build again") from None
    return len(examples)


def _example(file: str, label: int, text: str, root: Path) -> tf.train.Example:
    import tensorflow as tf
    from PIL import Image

    data = Path(file).read_bytes()
    with Image.open(file) as image:  # the header only: size and format, no decoding
        width, height, fmt = image.width, image.height, image.format or ""

    def feature(value: bytes | int) -> tf.train.Feature:
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features: dict[str, bytes | int] = {
        "image/encoded": data,
        "image/format": fmt.encode(),
        "image/class/label": label,
        "image/class/text": text.encode(),
        "image/filename": os.path.relpath(file, root).encode(),
        "image/height": height,
        "image/width": width,
    }
    return tf.train.Example(features=tf.train.Features(feature={k: feature(v) for k, v in features.items()}))


# --- the output folder -----------------------------------------------------------------------------------


def _check_out(root: Path, digest: str, overwrite: bool) -> None:
    """Refuse to write over another dataset's records, or into a folder of other files."""
    if overwrite or not root.is_dir():
        return
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())
            theirs, their_source = previous["source_digest"], previous.get("source", "?")
        except (OSError, ValueError, KeyError, TypeError):
            theirs, their_source = None, "unknown"
        if theirs != digest:
            raise ConfigError(
                f"{root}: holds records of another dataset ({their_source}); choose another folder, "
                "or pass --overwrite to replace them"
            )
    others = [p.name for p in root.iterdir() if not _OURS.match(p.name)]
    if others:
        raise ConfigError(
            f"{root}: holds other files ({others[0]}...); give a new or empty folder, or pass --overwrite"
        )


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write_atomic(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
