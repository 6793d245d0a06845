"""Keras callbacks the trainer adds to a fit: epoch timing and learning rate, divergence, reporting,
checkpoints, MLflow, and the switch of a two-phase fine-tune."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import keras

from workbench import models, signals
from workbench.checkpoints import CheckpointDir, State, improved, minimizes, save_rng
from workbench.outbox import Outbox

# (epoch from 1, metrics) -> stop? Studies pass one that reports to the Optuna trial and answers whether
# the pruner wants the trial stopped; training then ends normally after that epoch.
ReportFn = Callable[[int, dict[str, float]], bool | None]


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite."""


class EpochMetrics(keras.callbacks.Callback):
    """Adds learning_rate, epoch_seconds and images_per_second to each epoch's logs.

    Timing uses the callback hooks Keras already calls, so it adds no work to the training step.
    """

    def __init__(self, batch_size: int, steps_per_epoch: int):
        super().__init__()
        self.images = batch_size * steps_per_epoch
        self._start = self._train_end = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()
        self._train_end = 0.0

    def on_test_begin(self, logs: dict | None = None) -> None:
        if self._start and not self._train_end:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:  # Keras always passes the epoch's logs; they are what this adds to
            return
        now = time.perf_counter()
        train_seconds = (self._train_end or now) - self._start
        logs["epoch_seconds"] = now - self._start
        logs["images_per_second"] = self.images / train_seconds
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise Diverged(f"training loss became {loss} in epoch {epoch + 1}")


class Unfreeze(keras.callbacks.Callback):
    """Two-phase fine-tuning: the first `frozen_epochs` epochs train with `model.freeze`, the rest with the
    backbone unfrozen (models.unfreeze); the train step is traced again at the switch.

    The optimizer is built for the second phase's variables from the start, so the switch keeps it: the
    schedule, the step count and the classifier's slots go on. Between epochs the model carries the second
    phase's flags, so every checkpoint holds the optimizer's slots for every variable and loads back whole
    on resume; a first-phase epoch freezes again before its first step runs.
    """

    def __init__(self, setting: str | int, frozen_epochs: int):
        super().__init__()
        self.setting, self.frozen_epochs = setting, frozen_epochs

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if epoch < self.frozen_epochs:
            models.freeze(self.model.get_layer("backbone"), self.setting)
        elif epoch == self.frozen_epochs:
            self.model.make_train_function(force=True)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch < self.frozen_epochs:
            models.unfreeze(self.model.get_layer("backbone"), self.setting)


class Report(keras.callbacks.Callback):
    """Hands each epoch's metrics (epochs counted from 1) to a hook, and stops training when it says so."""

    def __init__(self, report: ReportFn):
        super().__init__()
        self.report = report

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with signals.held():
            stop = self.report(epoch + 1, {k: float(v) for k, v in (logs or {}).items()})
        if stop:
            self.model.stop_training = True


class MlflowEpochs(keras.callbacks.Callback):
    """Sends each epoch's metrics (step = epoch, from 1) to the run's outbox, and, when given a checkpoint
    folder, that epoch's checkpoint too; then tries to send what is pending (a server that is away makes
    the epoch wait no longer than a refused connection)."""

    def __init__(self, box: Outbox, every_epoch: CheckpointDir | None = None):
        super().__init__()
        self.box, self.every_epoch = box, every_epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with signals.held():
            self.box.metrics({k: float(v) for k, v in (logs or {}).items()}, epoch + 1)
            if self.every_epoch is not None:
                self.box.artifact(self.every_epoch.epoch_file(epoch + 1), "checkpoints")
            self.box.send()


class Checkpointer(keras.callbacks.Callback):
    """Writes last (and best) after every epoch, then the state that points at them.

    Keras's ModelCheckpoint writes in place, so a kill mid-write corrupts the file; this writes atomically
    and records the MLflow run id and epoch that resume needs.
    """

    def __init__(
        self, directory: CheckpointDir, state: State, monitor: str, mode: str, keep_best: bool, keep_every: bool
    ):
        super().__init__()
        self.dir, self.state, self.monitor = directory, state, monitor
        self.minimize = minimizes(monitor, mode)
        self.keep_best, self.keep_every = keep_best, keep_every
        self.best_improved = False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with signals.held():
            self._save(epoch, logs or {})

    def _save(self, epoch: int, logs: dict) -> None:
        self.dir.save(self.model, self.dir.last)
        if self.keep_every:
            self.dir.copy_last(self.dir.epoch_file(epoch + 1))
        value = logs.get(self.monitor)
        self.best_improved = value is not None and improved(value, self.state.best, self.minimize)
        if value is not None and self.best_improved:
            self.state.best = float(value)
            if self.keep_best:
                self.dir.copy_last(self.dir.best)
        self.state.epoch = epoch + 1
        self.state.metrics = {k: float(v) for k, v in logs.items()}
        self.state.rng = save_rng(self.model)
        self.dir.write_state(self.state)


class LossRecorder(keras.callbacks.Callback):
    """The learning-rate finder's probe: each batch's own training loss (the metrics restart every batch,
    so Keras's running mean is that batch's), its bias-corrected moving average, and the stop once the
    average passes `diverged` times its best or the loss is no longer finite."""

    def __init__(self, beta: float, diverged: float):
        super().__init__()
        self.beta, self.diverged = beta, diverged
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.stop = "the ramp ended"
        self._average = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.model.reset_metrics()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {})["loss"])
        self._average = self.beta * self._average + (1 - self.beta) * loss
        smoothed = self._average / (1 - self.beta ** (len(self.losses) + 1))
        self.losses.append(loss)
        self.smoothed.append(smoothed)
        if not math.isfinite(smoothed):
            self.stop, self.model.stop_training = "the loss became NaN", True
        elif smoothed > self.diverged * min(self.smoothed):
            self.stop, self.model.stop_training = f"the smoothed loss passed {self.diverged:g}x its lowest", True
