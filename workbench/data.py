"""tf.data pipelines over a Source: parallel decode and augmentation, batching, prefetch.

The training stream is one endless sequence of per-epoch permutations, each drawn from (seed, epoch), and
Keras takes `steps_per_epoch` batches from it per epoch. Resuming at epoch k skips exactly the examples
the first k epochs consumed, so a resumed run sees the same batches as an uninterrupted one.

TFRecord shards (data=tfrecord) follow the same rule: each epoch reads the shards in an order drawn from
(seed, epoch), interleaved deterministically, then shuffles blocks of records with permutations drawn from
(seed, epoch, block). Whole epochs before the resumed one are not read at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf
from omegaconf import DictConfig

from workbench import augment, records, sources
from workbench.sources import Source, Split

AUTOTUNE = tf.data.AUTOTUNE
# Records: shards read at once, and the records shuffled together. Fixed numbers, not the machine's core
# count: the order of the stream must not depend on where it runs, or a resume elsewhere would differ.
SHARDS_AT_ONCE = 8
SHUFFLE_BLOCK = 1024

# index (or serialized record) -> (image, one-hot label)
LoadFn = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


@dataclass
class Pipelines:
    train: tf.data.Dataset
    val: tf.data.Dataset
    steps_per_epoch: int


def build(
    source: Source,
    cfg: DictConfig,
    size: int,
    preprocess: Callable[[tf.Tensor], tf.Tensor],
    initial_epoch: int = 0,
) -> Pipelines:
    """Training and validation datasets of (preprocessed images, one-hot labels)."""
    trainer = cfg.trainer
    batch = trainer.batch_size
    n = len(source.train)
    sources.check_batch_size(source, batch)  # the trainer checked already, before creating any store
    steps = trainer.steps_per_epoch or n // batch
    load = _loader(source.train, source.num_classes)
    transform = augment.train_transform(cfg.augmentation, size)
    mix = augment.batch_transform(cfg.augmentation)
    seed = tf.constant(trainer.seed, tf.int64)

    per_epoch = (n // batch) * batch  # whole batches only: static shapes for XLA and replicas
    consumed = initial_epoch * steps * batch
    first = consumed // per_epoch  # the epoch the resumed stream starts in: earlier ones are never read

    def example(position: tf.Tensor, item: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image, label = load(item)
        image = transform(image, tf.stack([position, seed]))
        return position, image, label

    def finish(positions: tf.Tensor, images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if mix is not None:
            images, labels = mix(images, labels, tf.stack([positions[0], seed + 1]))
        return preprocess(images), labels

    train = (
        tf.data.Dataset.range(first, 2**62)  # endless: Keras counts steps_per_epoch batches per epoch
        .flat_map(_epochs(source.train, per_epoch, seed))
        .enumerate(start=first * per_epoch)  # an example's position seeds its augmentation
        .skip(consumed - first * per_epoch)
        .map(example, num_parallel_calls=AUTOTUNE)
        .ignore_errors(log_warning=True)  # a file that will not decode is skipped, never a crash mid-epoch
        .batch(batch, drop_remainder=True)
        .map(finish, num_parallel_calls=AUTOTUNE)
        .prefetch(AUTOTUNE)
    )

    val = examples(source.val, source.num_classes)
    val = val.map(lambda image, label: (augment.resize(image, size), label), num_parallel_calls=AUTOTUNE).batch(batch)
    if trainer.validation_steps:
        val = val.take(trainer.validation_steps)  # the same batches every epoch
    val = val.map(lambda images, labels: (preprocess(images), labels), num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
    return Pipelines(train, val, steps)


def _epochs(split: Split, per_epoch: int, seed: tf.Tensor) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """epoch -> the epoch's `per_epoch` items (indices, or serialized records), in an order drawn from (seed, epoch)."""
    if split.shards is None:
        n = len(split)

        def epoch_order(epoch: tf.Tensor) -> tf.data.Dataset:
            order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([seed, epoch]))
            return tf.data.Dataset.from_tensor_slices(order[:per_epoch])

        return epoch_order
    shards = tf.constant(split.shards)

    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        epoch_seed = tf.stack([seed, epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.size(shards)), seed=epoch_seed)
        stream = tf.data.Dataset.from_tensor_slices(tf.gather(shards, order)).interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(len(split.shards or ()), SHARDS_AT_ONCE),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,  # parallel reads, the same order every time
        )

        def shuffled(block: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
            block_seed = tf.random.experimental.stateless_fold_in(epoch_seed, index)
            return tf.gather(block, tf.random.experimental.stateless_shuffle(tf.range(tf.size(block)), block_seed))

        blocks = stream.batch(SHUFFLE_BLOCK).enumerate().map(lambda i, block: shuffled(block, i))
        return blocks.unbatch().take(per_epoch)

    return epoch_records


def examples(split: Split, num_classes: int) -> tf.data.Dataset:
    """(uint8 image HxWx3, one-hot label) of every example of `split` that decodes, in its stored order
    (records as written: the image folder's order): what validation and `workbench eval` read."""
    items = tf.data.TFRecordDataset(split.shards) if split.shards else tf.data.Dataset.range(len(split))
    dataset = items.map(_loader(split, num_classes), num_parallel_calls=AUTOTUNE)
    return dataset if split.images is not None else dataset.ignore_errors(log_warning=True)


def _loader(split: Split, num_classes: int) -> LoadFn:
    """index (or serialized record) -> (uint8 image HxWx3, one-hot float32 label)."""
    if split.shards is not None:

        def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            data, label = records.parse(record)
            return _decode(data), tf.one_hot(label, num_classes)

        return parse
    labels = tf.one_hot(tf.constant(split.labels), num_classes)
    if split.images is not None:
        images = tf.constant(split.images)
        return lambda i: (tf.gather(images, i), tf.gather(labels, i))
    files = tf.constant(split.files)
    return lambda i: (_decode(tf.io.read_file(tf.gather(files, i))), tf.gather(labels, i))


def _decode(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG, PNG, GIF or BMP bytes -> uint8 HxWx3; the same for image files and records."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image
