"""Fine-tuning a backbone: the classifier kept or renewed, the two-phase switch (trainer.freeze_epochs) and
exact resume on either side of it, and weight averaging that warms up as the Inception trainer's does."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import TINY, compose_config
from workbench import models
from workbench.config import ConfigError, validate
from workbench.train import checkpoint_dir, train

QUIET = [*TINY, "tracking.log_model=false", "tracking.checkpoints=none"]


@pytest.fixture
def checkpoint(workdir: Path) -> Path:
    """A small_cnn checkpoint trained here on digits (10 classes)."""
    first = compose_config([*TINY, "tracking.log_model=false", "tracking.checkpoints=best"])
    train(first)
    return checkpoint_dir(first) / "best.keras"


def _weights(path: Path, layer: str) -> list[np.ndarray]:
    model = keras.saving.load_model(path)
    return model.get_layer(layer).get_weights()


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_classifier_of_the_same_size_is_kept_unless_renewed(checkpoint: Path) -> None:
    kept = models.build(compose_config([*TINY, f"model.weights={checkpoint}"]).model, num_classes=10)
    assert _same(kept.get_layer("classifier").get_weights(), _weights(checkpoint, "classifier"))
    renewed = compose_config([*TINY, f"model.weights={checkpoint}", "model.new_classifier=true"])
    fresh = models.build(renewed.model, num_classes=10)
    assert not _same(fresh.get_layer("classifier").get_weights(), _weights(checkpoint, "classifier"))
    assert _same(fresh.get_layer("backbone").get_weights(), _weights(checkpoint, "backbone"))


def test_head_only_epochs_then_the_whole_backbone(checkpoint: Path) -> None:
    cfg = compose_config(
        [
            *TINY,
            "tracking.log_model=false",
            "tracking.checkpoints=every_epoch",
            f"model.weights={checkpoint}",
            "model.freeze=backbone",
            "trainer.freeze_epochs=1",
            "optimizer.learning_rate=0.01",
        ]
    )
    train(cfg)
    folder = checkpoint_dir(cfg)
    before, frozen, unfrozen = (
        keras.saving.load_model(p).get_layer("backbone")
        for p in (checkpoint, folder / "epoch-0001.keras", folder / "epoch-0002.keras")
    )
    for layer in before.layers:
        if not layer.get_weights():
            continue
        loaded = layer.get_weights()
        assert _same(loaded, frozen.get_layer(layer.name).get_weights()), f"{layer.name} changed in the head-only epoch"
        changed = not _same(loaded, unfrozen.get_layer(layer.name).get_weights())
        # After the switch the convolutions train; BatchNormalization stays frozen, statistics and all.
        assert changed == layer.name.startswith("conv"), layer.name
    heads = [_weights(p, "classifier") for p in (checkpoint, folder / "epoch-0001.keras", folder / "epoch-0002.keras")]
    assert not _same(heads[0], heads[1]) and not _same(heads[1], heads[2])


@pytest.mark.parametrize("stop_after", [1, 2], ids=["inside-the-first-phase", "at-the-switch"])
def test_resume_is_exact_on_either_side_of_the_switch(checkpoint: Path, tmp_path: Path, stop_after: int) -> None:
    def config(folder: str, resume: bool = False):
        return compose_config(
            [
                *QUIET,
                "trainer.epochs=3",
                "trainer.deterministic=true",
                f"model.weights={checkpoint}",
                "model.freeze=backbone",
                "trainer.freeze_epochs=2",
                "optimizer=momentum",  # slots for every variable, which resume must restore
                "optimizer.learning_rate=0.01",
                f"trainer.checkpoint_dir={tmp_path / folder}",
                f"trainer.resume={str(resume).lower()}",
            ]
        )

    def stop(epoch: int, metrics: dict[str, float]) -> None:
        if epoch > stop_after:  # after epoch `stop_after`'s checkpoint, before the next one's
            raise KeyboardInterrupt

    straight = train(config("straight"))
    with pytest.raises(KeyboardInterrupt):
        train(config("interrupted"), report=stop)
    resumed = train(config("interrupted", resume=True))
    assert resumed.metrics["loss"] == straight.metrics["loss"]
    final = [keras.saving.load_model(tmp_path / f / "last.keras").get_weights() for f in ("straight", "interrupted")]
    assert _same(*final)


def test_freeze_epochs_needs_a_freeze_and_a_later_end() -> None:
    with pytest.raises(ConfigError, match=r"^trainer.freeze_epochs=1: model.freeze is none, so there is nothing"):
        validate(compose_config([*TINY, "trainer.freeze_epochs=1"]))
    with pytest.raises(ConfigError, match=r"^trainer.freeze_epochs=2: the backbone would never unfreeze"):
        validate(compose_config([*TINY, "model.weights=imagenet", "model.freeze=backbone", "trainer.freeze_epochs=2"]))
    with pytest.raises(ConfigError, match=r"^model.new_classifier=yes: must be true or false"):
        validate(compose_config([*TINY, "model.new_classifier=yes"]))


def test_weight_average_warms_up_as_the_inception_trainer_does() -> None:
    from workbench.optim import build_optimizer

    cfg = compose_config(["recipe=inception_v3_finetune", "model.weights=imagenet"])
    optimizer = build_optimizer(cfg.optimizer, cfg.schedule, 100, cfg.trainer.epochs)
    assert optimizer.ema_momentum == pytest.approx(0.9999)
    variable = keras.Variable(np.zeros(3, np.float32))
    optimizer.build([variable])
    rng = np.random.default_rng(0)
    warm = plain = None  # the Inception trainer's rule, and Keras's constant momentum
    for step in range(40):
        optimizer.apply([keras.ops.convert_to_tensor(rng.normal(size=3).astype(np.float32))], [variable])
        value = keras.ops.convert_to_numpy(variable)
        momentum = min(0.9999, (1 + step) / (10 + step))
        warm = value if warm is None else momentum * warm + (1 - momentum) * value
        plain = value if plain is None else 0.9999 * plain + 0.0001 * value
    average = keras.ops.convert_to_numpy(optimizer._model_variables_moving_average[0])
    np.testing.assert_allclose(average, warm, rtol=1e-5, atol=1e-6)
    assert not np.allclose(average, plain, atol=1e-2)


def test_a_short_fine_tune_with_the_recipe_validates_as_well_as_without_averaging(checkpoint: Path) -> None:
    """The recipe's optimizer (RMSprop at 0.001, averaging 0.9999) on small_cnn: InceptionV3 itself takes
    minutes on a CPU to get anywhere, which the averaging's effect does not depend on."""
    common = [
        "recipe=inception_v3_finetune",
        "model=small_cnn",
        "augmentation=none",
        f"model.weights={checkpoint}",
        "model.new_classifier=true",
        "model.input_size=16",
        "trainer.batch_size=32",
        "trainer.epochs=3",
        "trainer.steps_per_epoch=30",
        "tracking.log_model=false",
        "tracking.checkpoints=none",
    ]
    averaged = train(compose_config(common)).metrics["val_accuracy"]
    plain = train(compose_config([*common, "optimizer.ema=null"])).metrics["val_accuracy"]
    assert plain > 0.5  # the fine-tune itself works
    assert averaged > 0.8 * plain, (averaged, plain)  # without the warm-up: about 0.1, chance on digits
