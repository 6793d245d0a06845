"""The shared trainer in-process: every option group trains, fine-tuning, precision, distribution, hooks."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import TINY, compose_config
from workbench.train import checkpoint_dir, train

QUIET = [*TINY, "tracking.log_model=false", "tracking.checkpoints=none"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["augmentation=flip_crop"],
        ["augmentation=inception"],
        ["augmentation=mixup"],
        ["optimizer=rmsprop", "schedule=exponential"],
        ["optimizer=nesterov", "schedule=piecewise", "schedule.boundaries_epochs=[1]"],
        ["optimizer=adamw", "schedule=cosine", "schedule.warmup_epochs=1"],
        ["optimizer=momentum", "optimizer.ema=0.99", "optimizer.clipnorm=1.0"],
        ["optimizer.weight_decay=1.0e-4", "optimizer.l2_kernels_only=true", "trainer.label_smoothing=0.1"],
        ["trainer.mixed_precision=bfloat16"],
        ["trainer.distribute=mirrored"],
        ["data=synthetic", "data.num_examples=64", "data.num_classes=3"],
    ],
    ids=lambda o: " ".join(o),
)
def test_every_option_trains(workdir: Path, overrides: list[str]) -> None:
    cfg = compose_config([*QUIET, *overrides])
    metrics = train(cfg).metrics
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds", "images_per_second"):
        assert np.isfinite(metrics[key]), key
    # Top-5 only where it can be below 1: more than 5 classes (digits has 10).
    classes = cfg.data.num_classes if cfg.data.name == "synthetic" else 10
    assert ("top5_accuracy" in metrics) == (classes > 5) == ("val_top5_accuracy" in metrics)


def test_system_metrics_are_sampled_while_a_run_trains_and_can_be_switched_off(workdir: Path) -> None:
    from mlflow.tracking import MlflowClient

    sampled = train(compose_config([*QUIET, "tracking.system_metrics_interval_s=0.2"])).run_id
    off = train(compose_config([*QUIET, "tracking.system_metrics=false"])).run_id
    client = MlflowClient()
    history = client.get_metric_history(sampled, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and all(0 <= m.value <= 100 for m in history)
    memory = client.get_metric_history(sampled, "system/system_memory_usage_megabytes")
    assert memory and all(m.value > 0 for m in memory)
    assert not [key for key in client.get_run(off).data.metrics if key.startswith("system/")]


def test_precision_policy_does_not_leak_into_the_next_run(workdir: Path) -> None:
    train(compose_config([*QUIET, "trainer.mixed_precision=float16"]))
    assert keras.mixed_precision.global_policy().name == "float32"


def test_kernel_l2_adds_a_penalty_to_kernels_only(workdir: Path) -> None:
    from workbench import models

    cfg = compose_config(["model.input_size=16"])
    model = models.build(cfg.model, 10)
    models.add_kernel_l2(model, 1e-4)
    regularised = [v.path for v in model.trainable_variables if v.regularizer is not None]
    assert regularised and all(p.endswith("kernel") for p in regularised)
    assert len(model.losses) == len(regularised)


def test_report_hook_sees_every_epoch_and_can_stop(workdir: Path) -> None:
    seen = []

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        seen.append((epoch, metrics["val_accuracy"]))
        return epoch == 2  # stop after the second of four epochs, like a pruner

    train(compose_config([*QUIET, "trainer.epochs=4"]), report=report)
    assert [e for e, _ in seen] == [1, 2]


def test_fine_tune_from_a_checkpoint_keeps_the_backbone_and_renews_the_classifier(workdir: Path) -> None:
    first = compose_config([*TINY, "tracking.log_model=false", "tracking.checkpoints=best"])
    train(first)
    checkpoint = checkpoint_dir(first) / "best.keras"
    source = keras.saving.load_model(checkpoint)

    from workbench import models

    cfg = compose_config([*TINY, f"model.weights={checkpoint}"])
    tuned = models.build(cfg.model, num_classes=4)
    for a, b in zip(source.get_layer("backbone").get_weights(), tuned.get_layer("backbone").get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert tuned.get_layer("classifier").get_weights()[0].shape[-1] == 4  # a new, re-initialised head
    train(compose_config([*QUIET, f"model.weights={checkpoint}", "optimizer.learning_rate=0.0001"]))


@pytest.fixture
def checkpoint(workdir: Path) -> Path:
    """A small_cnn checkpoint trained here: the weights that frozen layers must keep."""
    first = compose_config([*TINY, "tracking.log_model=false", "tracking.checkpoints=best"])
    train(first)
    return checkpoint_dir(first) / "best.keras"


@pytest.mark.parametrize(
    ("freeze", "frozen"),
    [("backbone", ("conv0", "bn0", "conv1", "bn1", "conv2", "bn2")), (4, ("conv0", "bn0", "conv1", "bn1"))],
    ids=["backbone", "all-but-4"],
)
def test_frozen_layers_keep_their_weights_bit_for_bit(checkpoint: Path, freeze: str | int, frozen: tuple) -> None:
    cfg = compose_config(
        [*QUIET, f"model.weights={checkpoint}", f"model.freeze={freeze}", "optimizer.learning_rate=0.01"]
    )
    train(cfg)
    before = keras.saving.load_model(checkpoint).get_layer("backbone")
    after = keras.saving.load_model(checkpoint_dir(cfg) / "last.keras").get_layer("backbone")
    for layer in before.layers:
        weights = zip(layer.get_weights(), after.get_layer(layer.name).get_weights(), strict=True)
        same = all(np.array_equal(a, b) for a, b in weights)
        # BatchNormalization's moving statistics included: a frozen BN layer runs in inference mode.
        assert same == (layer.name in frozen or not layer.get_weights()), layer.name
    tuned = keras.saving.load_model(checkpoint_dir(cfg) / "last.keras").get_layer("classifier").get_weights()[0]
    assert not np.array_equal(tuned, keras.saving.load_model(checkpoint).get_layer("classifier").get_weights()[0])


def test_weights_of_another_architecture_or_too_deep_a_freeze_are_refused(checkpoint: Path) -> None:
    from workbench import models
    from workbench.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"a small_cnn checkpoint, and model=mobilenet_v2 cannot take its weights"):
        validate(compose_config(["model=mobilenet_v2", f"model.weights={checkpoint}"]))
    cfg = compose_config([*QUIET, f"model.weights={checkpoint}", "model.freeze=50"])
    validate(cfg)  # the layer count is known once the model is built
    with pytest.raises(ConfigError, match=r"model.freeze=50: the backbone of this model has 12 layers"):
        models.build(cfg.model, num_classes=10)


def test_weights_from_an_mlflow_run_or_its_logged_model(workdir: Path) -> None:
    import mlflow

    from workbench.config import ConfigError

    def backbone_weights(path: Path | str) -> list[np.ndarray]:
        model = keras.saving.load_model(path) if str(path).endswith(".keras") else mlflow.keras.load_model(path)
        return model.get_layer("backbone").get_weights()

    first = compose_config([*TINY, "tracking.log_model=false", "tracking.checkpoints=best"])
    with_checkpoint = train(first).run_id
    with_model = train(compose_config([*QUIET, "tracking.log_model=true", "trainer.seed=1"])).run_id
    sources = {
        with_checkpoint: checkpoint_dir(first) / "best.keras",  # a run id: its best checkpoint
        f"runs:/{with_checkpoint}": checkpoint_dir(first) / "best.keras",
        with_model: f"runs:/{with_model}/model",  # no checkpoint uploaded: its logged model
    }
    for weights, origin in sources.items():
        cfg = compose_config([*QUIET, f"model.weights={weights}", "model.freeze=backbone"])
        train(cfg)
        tuned = backbone_weights(checkpoint_dir(cfg) / "last.keras")
        assert all(np.array_equal(a, b) for a, b in zip(backbone_weights(origin), tuned, strict=True)), weights

    with pytest.raises(ConfigError, match=f"model.weights={'0' * 32}: no run {'0' * 32} in sqlite:"):
        train(compose_config([*QUIET, f"model.weights={'0' * 32}"]))
    with pytest.raises(ConfigError, match="a small_cnn checkpoint, and model=mobilenet_v2 cannot take its weights"):
        train(
            compose_config(
                [*QUIET, "model=mobilenet_v2", "model.input_size=32", f"model.weights=runs:/{with_checkpoint}"]
            )
        )
