"""Augmentation policies as tf.data maps, not model layers, so XLA stays usable.

Every random op is stateless and seeded by the example's position in the stream, so a resumed run sees
exactly the augmentations an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig

if TYPE_CHECKING:  # TensorFlow loads with the first map built, not with validation, which reads POLICIES
    import tensorflow as tf

    ImageFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
    BatchFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Float32 [0, 255] image of size x size."""
    import tensorflow as tf

    return tf.image.resize(tf.cast(image, tf.float32), (size, size))


def train_transform(aug_cfg: DictConfig, size: int) -> ImageFn:
    """(image uint8 HxWx3, seed [2]) -> float32 [0, 255] size x size x 3."""
    return _policy(aug_cfg.name).image(aug_cfg, size)


def batch_transform(aug_cfg: DictConfig) -> BatchFn | None:
    """A map over whole batches (images, one-hot labels, seed), or None when the policy has none."""
    batch = _policy(aug_cfg.name).batch
    return batch(aug_cfg) if batch else None


def _policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"augmentation.name={name}")  # validate() refuses this earlier
    return POLICIES[name]


def _resize_only(aug_cfg: DictConfig, size: int) -> ImageFn:
    return lambda image, seed: resize(image, size)


def _flip_crop(aug_cfg: DictConfig, size: int) -> ImageFn:
    import tensorflow as tf

    pad = round(size * aug_cfg.pad_fraction)

    def flip_crop(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        seeds = tf.random.experimental.stateless_split(seed, 2)
        image = tf.image.resize_with_crop_or_pad(resize(image, size), size + 2 * pad, size + 2 * pad)
        image = tf.image.stateless_random_crop(image, (size, size, 3), seed=seeds[0])
        return tf.image.stateless_random_flip_left_right(image, seed=seeds[1])

    return flip_crop


def _inception_distortions(aug_cfg: DictConfig, size: int) -> ImageFn:
    return lambda image, seed: _inception(image, seed, size, aug_cfg)


def _inception(image: tf.Tensor, seed: tf.Tensor, size: int, cfg: DictConfig) -> tf.Tensor:
    # The Inception trainer's distort_image: a distorted bounding-box crop, a flip, colour jitter.
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 6)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seeds[0],
        min_object_covered=cfg.min_object_covered,
        aspect_ratio_range=list(cfg.aspect_ratio_range),
        area_range=list(cfg.area_range),
        max_attempts=100,
        use_image_if_no_bounding_boxes=True,
    )
    image = resize(tf.slice(image, begin, extent), size)
    image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
    if cfg.color:
        image = image / 255.0
        image = tf.image.stateless_random_brightness(image, 32.0 / 255.0, seed=seeds[2])
        image = tf.image.stateless_random_saturation(image, 0.5, 1.5, seed=seeds[3])
        image = tf.image.stateless_random_hue(image, 0.2, seed=seeds[4])
        image = tf.image.stateless_random_contrast(image, 0.5, 1.5, seed=seeds[5])
        image = tf.clip_by_value(image, 0.0, 1.0) * 255.0
    return image


def _mixup(aug_cfg: DictConfig) -> BatchFn:
    import tensorflow as tf

    alpha = float(aug_cfg.alpha)

    def mixup(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        seeds = tf.random.experimental.stateless_split(seed, 3)
        n = tf.shape(images)[0]
        # Beta(alpha, alpha) from two Gamma draws.
        g1 = tf.random.stateless_gamma([n], seed=seeds[0], alpha=alpha)
        g2 = tf.random.stateless_gamma([n], seed=seeds[1], alpha=alpha)
        weight = g1 / (g1 + g2)
        partner = tf.random.experimental.stateless_shuffle(tf.range(n), seed=seeds[2])
        w_img = tf.reshape(weight, [-1, 1, 1, 1])
        w_lab = tf.reshape(weight, [-1, 1])
        images = w_img * images + (1.0 - w_img) * tf.gather(images, partner)
        labels = w_lab * labels + (1.0 - w_lab) * tf.gather(labels, partner)
        return images, labels

    return mixup


@dataclass(frozen=True)
class Policy:
    """A map over single images (flip, crop...), and optionally one over whole batches (mixup)."""

    image: Callable[[DictConfig, int], ImageFn]
    batch: Callable[[DictConfig], BatchFn] | None = None


# augmentation.name -> policy: a new policy is one entry here and one YAML file in conf/augmentation/;
# validation (config.py) reads the names from here.
POLICIES: dict[str, Policy] = {
    "none": Policy(_resize_only),
    "flip_crop": Policy(_flip_crop),
    "inception": Policy(_inception_distortions),
    "mixup": Policy(_flip_crop, _mixup),
}
