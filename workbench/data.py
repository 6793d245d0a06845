"""tf.data pipelines over a Source: parallel decode and augmentation, batching, prefetch.

The training stream is one endless sequence of per-epoch permutations, each drawn from (seed, epoch), and
Keras takes `steps_per_epoch` batches from it per epoch. Resuming at epoch k skips exactly the examples
the first k epochs consumed, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf
from omegaconf import DictConfig

from workbench import augment, sources
from workbench.sources import Source, Split

AUTOTUNE = tf.data.AUTOTUNE

# index -> (image, one-hot label)
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

    def epoch_order(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([seed, epoch]))
        return tf.data.Dataset.from_tensor_slices(order[:per_epoch])

    def example(position: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image, label = load(index)
        image = transform(image, tf.stack([position, seed]))
        return position, image, label

    def finish(positions: tf.Tensor, images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if mix is not None:
            images, labels = mix(images, labels, tf.stack([positions[0], seed + 1]))
        return preprocess(images), labels

    train = (
        tf.data.Dataset.range(2**62)  # endless: Keras counts steps_per_epoch batches per epoch
        .flat_map(epoch_order)
        .enumerate()
        .skip(initial_epoch * steps * batch)
        .map(example, num_parallel_calls=AUTOTUNE)
        .ignore_errors(log_warning=True)  # a file that will not decode is skipped, never a crash mid-epoch
        .batch(batch, drop_remainder=True)
        .map(finish, num_parallel_calls=AUTOTUNE)
        .prefetch(AUTOTUNE)
    )

    val_load = _loader(source.val, source.num_classes)
    val = tf.data.Dataset.range(len(source.val)).map(lambda i: _resized(val_load(i), size), num_parallel_calls=AUTOTUNE)
    if source.val.files is not None:
        val = val.ignore_errors(log_warning=True)
    val = val.batch(batch)
    if trainer.validation_steps:
        val = val.take(trainer.validation_steps)  # the same batches every epoch
    val = val.map(lambda images, labels: (preprocess(images), labels), num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
    return Pipelines(train, val, steps)


def _resized(example: tuple[tf.Tensor, tf.Tensor], size: int) -> tuple[tf.Tensor, tf.Tensor]:
    image, label = example
    return augment.resize(image, size), label


def _loader(split: Split, num_classes: int) -> LoadFn:
    """index -> (uint8 image HxWx3, one-hot float32 label)."""
    labels = tf.one_hot(tf.constant(split.labels), num_classes)
    if split.images is not None:
        images = tf.constant(split.images)
        return lambda i: (tf.gather(images, i), tf.gather(labels, i))
    files = tf.constant(split.files)

    def read(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        data = tf.io.read_file(tf.gather(files, i))
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return image, tf.gather(labels, i)

    return read
