"""The tf.data pipeline: reproducible per epoch, exact when resumed, augmentations seeded by position."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from helpers import compose_config
from workbench import augment, data, models, sources


def _batches(overrides: list[str], initial_epoch: int = 0, count: int = 3) -> tuple[list[np.ndarray], int]:
    cfg = compose_config(["model.input_size=16", "trainer.batch_size=64", *overrides])
    source = sources.load(cfg.data, 16)
    pipes = data.build(source, cfg, 16, models.preprocessor(cfg.model.name), initial_epoch=initial_epoch)
    return [x.numpy() for x, _ in pipes.train.take(count)], pipes.steps_per_epoch


def test_the_stream_is_reproducible_and_reshuffled_each_epoch() -> None:
    first, steps = _batches(["augmentation=flip_crop"], count=23)
    again, _ = _batches(["augmentation=flip_crop"], count=23)
    np.testing.assert_array_equal(first[0], again[0])
    assert steps == 1437 // 64
    assert not np.array_equal(first[0], first[steps]), "epoch 2 starts with a different batch"


def test_resuming_at_an_epoch_skips_exactly_the_examples_seen() -> None:
    whole, steps = _batches(["augmentation=inception"], count=2 * 22)
    resumed, _ = _batches(["augmentation=inception"], initial_epoch=1, count=1)
    np.testing.assert_array_equal(resumed[0], whole[steps])


def test_augmentations_depend_on_the_seed_only() -> None:
    cfg = compose_config(["augmentation=inception"])
    image = tf.constant(np.random.default_rng(0).integers(0, 255, (40, 40, 3)), tf.uint8)
    transform = augment.train_transform(cfg.augmentation, 32)
    a = transform(image, tf.constant([1, 7], tf.int64)).numpy()
    b = transform(image, tf.constant([1, 7], tf.int64)).numpy()
    c = transform(image, tf.constant([2, 7], tf.int64)).numpy()
    assert a.shape == (32, 32, 3) and a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mixup_blends_labels_into_distributions() -> None:
    cfg = compose_config(["augmentation=mixup"])
    mix = augment.batch_transform(cfg.augmentation)
    images = tf.random.stateless_uniform((8, 4, 4, 3), seed=[0, 0]) * 255.0
    labels = tf.one_hot(tf.range(8) % 4, 4)
    mixed_images, mixed_labels = mix(images, labels, tf.constant([3, 4], tf.int64))
    np.testing.assert_allclose(mixed_labels.numpy().sum(axis=1), 1.0, rtol=1e-6)
    assert (mixed_labels.numpy().max(axis=1) < 1.0).any(), "some labels are soft after mixing"
    assert mixed_images.shape == images.shape
