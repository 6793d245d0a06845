"""The input pipeline alone: images per second of the workbench's tf.data pipelines, no model.

    python bench/input_pipeline.py [--images 3000] [--size 224] [--repeats 5]

On a generated folder of realistic JPEGs (256-400 px a side, smooth noise, shapes and grain, quality 90;
cached in the temp folder with its records), each round measures, interleaved:

- tight loop: tf.io.decode_jpeg of the same training files one after another in a plain Python loop (read,
  decode, nothing else): the issue's ceiling, what this machine decodes with no pipeline around it;
- parallel decode: the same in a tf.data map with the pipelines' parallelism: a stricter ceiling, that
  only a pipeline doing nothing but decode could reach;
- decode+resize: the same, resized to the model's input (what any pipeline must do besides decoding);
- image_folder and tfrecord: the workbench's own `data.build(...)` training stream (data=image_folder and
  data=tfrecord of the same images), flip_crop augmentation, batches, the model's preprocessing.

It prints each one's median images/s and its ratios to both ceilings. The first batch of each
measurement (tracing, the first file opens) is left out.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the input pipeline runs on the CPU anyway

CLASSES = 4


def make_image(seed: int) -> bytes:
    """A JPEG that compresses like a photo: smooth colour fields, a few shapes, fine grain."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(256, 401, size=2))
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8))
    image = coarse.resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    grain = rng.normal(0, 6, size=(h, w, 3))
    pixels = np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def image_folder(n: int) -> Path:
    folder = Path(tempfile.gettempdir()) / f"workbench-bench-jpegs-{n}"
    done = folder / ".complete"
    if not done.exists():
        print(f"Writing {n} JPEGs to {folder} (once)...", flush=True)

        def write(i: int) -> None:
            path = folder / f"class_{i % CLASSES}" / f"image {i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(make_image(i))

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(write, range(n)))
        done.touch()
    return folder


def records_folder(src: Path) -> Path:
    from workbench import records

    out = src.with_name(src.name + "-records")
    if not (out / records.MANIFEST).exists():
        print(f"Building records in {out} (once)...", flush=True)
        start = time.perf_counter()
        manifest = records.build(str(src), str(out))
        count = sum(split["count"] for split in manifest["splits"].values())
        print(f"  {count} images in {time.perf_counter() - start:.1f} s", flush=True)
    return out


def measure(batches: Callable[[], Any], images: int) -> tuple[float, float]:
    """(images per second, CPU milliseconds per image) over `images` images of a fresh iterator, the first
    batch left out. CPU time counts every tf.data thread of this process: on a machine that other work
    shares, it holds where the wall-clock rate does not."""
    iterator = iter(batches())
    first = next(iterator)
    per_batch = int((first[0] if isinstance(first, tuple) else first).shape[0])
    start, cpu = time.perf_counter(), time.process_time()
    seen = 0
    while seen < images:
        next(iterator)
        seen += per_batch
    return seen / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / seen


def measure_tight_loop(files: list[str], images: int) -> tuple[float, float]:
    """measure() for a plain loop of eager decodes, one file at a time, the first left out."""
    import tensorflow as tf

    tf.io.decode_jpeg(tf.io.read_file(files[0]), channels=3)
    start, cpu = time.perf_counter(), time.process_time()
    for file in files[1 : images + 1]:
        tf.io.decode_jpeg(tf.io.read_file(file), channels=3)
    return images / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / images


def compose_config(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="JPEGs in the generated folder")
    parser.add_argument("--size", type=int, default=224, help="the model's input size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--measure", type=int, default=1536, help="images per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    src = image_folder(args.images)
    out = records_folder(src)

    import tensorflow as tf

    from workbench import augment, data, models, sources

    def config(name: str, path: Path) -> Any:
        return compose_config(
            [f"data={name}", f"data.path={path}", "augmentation=flip_crop", f"trainer.batch_size={args.batch}"]
        )

    def workbench(name: str, path: Path) -> Callable[[], tf.data.Dataset]:
        cfg = config(name, path)
        source = sources.load(cfg.data, args.size)
        return lambda: data.build(source, cfg, args.size, models.preprocessor(cfg.model.name)).train

    # The same training files the workbench reads, shuffled once, with the same parallelism (AUTOTUNE).
    cfg = config("image_folder", src)
    folder = sources.load(cfg.data, args.size)
    files = tf.data.Dataset.from_tensor_slices(np.random.default_rng(0).permutation(folder.train.files)).repeat()
    transform = augment.train_transform(cfg.augmentation, args.size)
    preprocess = models.preprocessor(cfg.model.name)

    def decoded(resize: bool) -> Callable[[], tf.data.Dataset]:
        def one(file: tf.Tensor) -> tf.Tensor:
            image = tf.io.decode_jpeg(tf.io.read_file(file), channels=3)
            if resize:
                image = tf.image.resize(image, (args.size, args.size))
            return tf.reduce_max(image[0, 0])  # a scalar: nothing to batch or copy, yet it needs the decode

        return lambda: files.map(one, tf.data.AUTOTUNE).batch(args.batch)

    def bare() -> tf.data.Dataset:
        """The workbench's work (decode, flip_crop, batch, preprocessing) as a plain tf.data pipeline."""

        def one(position: tf.Tensor, file: tf.Tensor) -> tf.Tensor:
            image = tf.io.decode_jpeg(tf.io.read_file(file), channels=3)
            return transform(image, tf.stack([position, tf.constant(0, tf.int64)]))

        batches = files.enumerate().map(one, tf.data.AUTOTUNE).batch(args.batch, drop_remainder=True)
        return batches.map(preprocess, tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    shuffled = [str(f) for f in np.random.default_rng(0).permutation(folder.train.files)]
    loop_images = min(args.measure, len(shuffled) - 1)
    pipelines = {
        "parallel decode": decoded(resize=False),
        "decode+resize": decoded(resize=True),
        "bare equivalent": bare,
        "image_folder": workbench("image_folder", src),
        "tfrecord": workbench("tfrecord", out),
    }
    kinds: dict[str, Callable[[], tuple[float, float]]] = {
        "tight loop": lambda: measure_tight_loop(shuffled, loop_images),
        **{kind: functools.partial(measure, batches, args.measure) for kind, batches in pipelines.items()},
    }
    results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    print(f"{len(folder.train)} training JPEGs, input {args.size} px, flip_crop, batch {args.batch}, {_cores()} cores")
    for round_ in range(args.repeats):  # interleaved: a slow spell of the machine hits every kind alike
        for kind, run in kinds.items():
            results[kind].append(run())
        print(f"  round {round_ + 1}: " + ", ".join(f"{k} {v[-1][0]:.0f}/s" for k, v in results.items()), flush=True)
    rate = {kind: statistics.median(r for r, _ in values) for kind, values in results.items()}
    cpu = {kind: statistics.median(c for _, c in values) for kind, values in results.items()}
    print(f"\n{'medians':<17}{'images/s':>9}{'of loop':>9}{'of parallel':>12}{'CPU ms/image':>14}")
    for kind in kinds:
        loop, parallel = rate[kind] / rate["tight loop"], rate[kind] / rate["parallel decode"]
        print(f"{kind:<17}{rate[kind]:>9.0f}{loop:>9.2f}{parallel:>12.2f}{cpu[kind]:>14.3f}")
    print("of loop / of parallel: images/s as a share of the tight loop's / the parallel decode's")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
