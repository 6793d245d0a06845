"""The learning-rate range test (Smith 2015; fastai's `lr_find`, Lightning's `Tuner.lr_find`): train the
composed config for a short exponential ramp of the learning rate, one loss per batch, until the smoothed
loss diverges, and suggest the learning rate where it falls fastest.

The probe is tracked in MLflow like a run (tag `workbench.kind=lr_find`, the curve as metrics, a PNG and a
CSV) but keeps no checkpoint and no model: it is a measurement, not a run to keep.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING

from omegaconf import DictConfig, open_dict

from workbench import models, sources
from workbench.config import ConfigError, config_hash, validate

if TYPE_CHECKING:
    import tensorflow as tf

    from workbench.train import RunContext

# As fastai and Lightning: the loss's moving average, the factor over its best that counts as divergence,
# and the points left out at each end when looking for the steepest descent (the ramp's start is noise).
BETA = 0.98
DIVERGED = 4.0
SKIP_BEGIN, SKIP_END = 10, 1


@dataclass(frozen=True)
class Curve:
    """The loss at each step of the ramp, raw and smoothed (bias-corrected moving average)."""

    learning_rates: list[float]
    losses: list[float]
    smoothed: list[float]
    stop: str  # why the ramp ended

    def suggestion(self) -> float | None:
        """The learning rate of the smoothed loss's steepest descent, per log-step of the learning rate;
        None when the loss never fell (the whole range is past divergence) or too few steps ran."""
        import numpy as np

        end = len(self.smoothed) - SKIP_END
        if end - SKIP_BEGIN < 2 or self.lowest_index() < SKIP_BEGIN:
            return None
        losses = np.array(self.smoothed[SKIP_BEGIN:end])
        gradient = np.gradient(losses, np.log10(self.learning_rates[SKIP_BEGIN:end]))
        steepest = int(np.argmin(gradient))
        return self.learning_rates[SKIP_BEGIN + steepest] if gradient[steepest] < 0 else None

    def lowest_index(self) -> int:
        finite = [(loss, i) for i, loss in enumerate(self.smoothed) if math.isfinite(loss)]
        return min(finite)[1] if finite else 0

    def search_range(self, suggested: float) -> tuple[float, float]:
        """A log-uniform range for a study: a decade below the suggestion, up to where the loss bottoms out
        (beyond it training diverges), at least a decade above the suggestion when the two are close."""
        return suggested / 10, max(self.learning_rates[self.lowest_index()], suggested * 10)


@dataclass(frozen=True)
class Finding:
    run_id: str
    curve: Curve
    suggested: float | None


def check_range(min_lr: float, max_lr: float, steps: int) -> None:
    """Refuse a ramp that cannot run, before anything loads."""
    if not (math.isfinite(min_lr) and min_lr > 0):
        raise ConfigError(f"--min {min_lr:g}: the lowest learning rate must be a number above 0, e.g. 1e-7")
    if not (math.isfinite(max_lr) and max_lr > min_lr):
        raise ConfigError(f"--max {max_lr:g}: must be above --min {min_lr:g}, e.g. 10")
    fewest = SKIP_BEGIN + SKIP_END + 3
    if steps < fewest:
        raise ConfigError(f"--steps {steps}: at least {fewest}, for a slope to be found; 100 is usual")


def ramp(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """The learning rate at each step: from min_lr to max_lr, a constant factor a step."""
    return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]


def find(cfg: DictConfig, context: RunContext, min_lr: float, max_lr: float, steps: int) -> Finding:
    """Run the range test on the composed config, tracked as an MLflow run; see the module's docstring."""
    import mlflow

    from workbench import tracking
    from workbench.train import keras_session, log_config

    check_range(min_lr, max_lr, steps)
    validate(cfg)
    size = models.input_size(cfg.model)
    source = sources.load(cfg.data, size)
    sources.check_batch_size(source, cfg.trainer.batch_size)
    experiment_id = tracking.configure(cfg.tracking)
    with open_dict(cfg):
        cfg.tracking.run_name = cfg.tracking.run_name or f"lr-find-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = tracking.run_tags(cfg, context.choices, context.overrides, config_hash(cfg)) | {"workbench.kind": "lr_find"}
    with (
        tracking.local_weights(cfg.model) as model_cfg,
        keras_session(cfg.trainer) as strategy,
        tracking.run(cfg.tracking, experiment_id, Path("checkpoints"), tags=tags) as box,
    ):
        log_config(cfg, context)
        mlflow.log_params({"lr_find.min": min_lr, "lr_find.max": max_lr, "lr_find.steps": steps})
        curve = _probe(cfg, model_cfg, source, size, strategy, ramp(min_lr, max_lr, steps))
        suggested = curve.suggestion()
        for i, (lr, loss, smooth) in enumerate(zip(curve.learning_rates, curve.losses, curve.smoothed, strict=True)):
            values = {"lr_find_learning_rate": lr, "lr_find_loss": loss, "lr_find_smoothed_loss": smooth}
            box.metrics({k: v for k, v in values.items() if math.isfinite(v)}, i)
        with TemporaryDirectory() as tmp:
            for file in (_write_csv(curve, Path(tmp)), _plot(curve, suggested, Path(tmp))):
                box.artifact(file, "lr_find")
        if suggested is None:
            box.tag("workbench.lr_find", "no descent: the loss rose from the lowest learning rate")
        else:
            low, high = curve.search_range(suggested)
            box.metrics({"suggested_learning_rate": suggested, "suggested_low": low, "suggested_high": high}, 0)
        return Finding(box.run_id, curve, suggested)


def _probe(
    cfg: DictConfig,
    model_cfg: DictConfig,
    source: sources.Source,
    size: int,
    strategy: tf.distribute.Strategy,
    learning_rates: list[float],
) -> Curve:
    import keras

    from workbench import data
    from workbench.callbacks import LossRecorder
    from workbench.train import build_model

    steps = len(learning_rates)
    pipelines = data.build(source, cfg, size, models.preprocessor(cfg.model.name))
    # Keras's own schedule, the ramp exactly: min * (max/min) ** (step / (steps - 1)).
    schedule = keras.optimizers.schedules.ExponentialDecay(
        learning_rates[0], decay_steps=steps - 1, decay_rate=learning_rates[-1] / learning_rates[0]
    )
    with strategy.scope():
        model = build_model(cfg, model_cfg, source.num_classes, pipelines.steps_per_epoch, learning_rate=schedule)
    recorder = LossRecorder(BETA, DIVERGED)
    model.fit(pipelines.train, epochs=1, steps_per_epoch=steps, callbacks=[recorder], shuffle=False, verbose=0)
    return Curve(learning_rates[: len(recorder.losses)], recorder.losses, recorder.smoothed, recorder.stop)


def _write_csv(curve: Curve, folder: Path) -> Path:
    path = folder / "lr_find.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "learning_rate", "loss", "smoothed_loss"])
        for i, row in enumerate(zip(curve.learning_rates, curve.losses, curve.smoothed, strict=True)):
            writer.writerow([i, *row])
    return path


def _plot(curve: Curve, suggested: float | None, folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve.learning_rates, curve.losses, alpha=0.3, label="loss")
    ax.plot(curve.learning_rates, curve.smoothed, label="smoothed loss")
    if suggested is not None:
        ax.axvline(suggested, color="red", linestyle="--", label=f"suggested {suggested:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test ({curve.stop})")
    ax.legend()
    fig.tight_layout()
    path = folder / "lr_find.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
