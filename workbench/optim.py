"""Optimizers and learning-rate schedules, with every epoch quantity converted to steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras
    from omegaconf import DictConfig


def build_schedule(
    opt_cfg: DictConfig, sched_cfg: DictConfig, steps_per_epoch: int, epochs: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate at every step. Epochs become steps with the real steps per epoch:
    decaying every 2.4 epochs means every 2.4 x steps_per_epoch steps."""
    build = SCHEDULES.get(sched_cfg.name)
    if build is None:
        raise ValueError(f"schedule.name={sched_cfg.name}")  # validate() refuses this earlier
    return build(float(opt_cfg.learning_rate), sched_cfg, steps_per_epoch, epochs)


def _constant(lr: float, sched_cfg: DictConfig, steps_per_epoch: int, epochs: int) -> float:
    return lr


def _exponential(
    lr: float, sched_cfg: DictConfig, steps_per_epoch: int, epochs: int
) -> keras.optimizers.schedules.LearningRateSchedule:
    import keras

    return keras.optimizers.schedules.ExponentialDecay(
        lr,
        decay_steps=sched_cfg.epochs_per_decay * steps_per_epoch,
        decay_rate=sched_cfg.decay_factor,
        staircase=sched_cfg.staircase,
    )


def _cosine(
    lr: float, sched_cfg: DictConfig, steps_per_epoch: int, epochs: int
) -> keras.optimizers.schedules.LearningRateSchedule:
    import keras

    warmup_steps = round(sched_cfg.warmup_epochs * steps_per_epoch)
    decay_steps = max(1, epochs * steps_per_epoch - warmup_steps)
    alpha = sched_cfg.min_learning_rate / lr
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps, alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps, alpha=alpha, warmup_target=lr, warmup_steps=warmup_steps
    )


def _piecewise(
    lr: float, sched_cfg: DictConfig, steps_per_epoch: int, epochs: int
) -> keras.optimizers.schedules.LearningRateSchedule:
    import keras

    boundaries = [round(b * steps_per_epoch) for b in sched_cfg.boundaries_epochs]
    values = [lr * sched_cfg.decay_factor**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


# schedule.name -> builder: a new schedule is one entry here and one YAML file in conf/schedule/;
# validation (config.py) reads the names from here.
SCHEDULES: dict[str, Callable[[float, DictConfig, int, int], Any]] = {
    "constant": _constant,
    "exponential": _exponential,
    "cosine": _cosine,
    "piecewise": _piecewise,
}


def build_optimizer(
    opt_cfg: DictConfig,
    sched_cfg: DictConfig,
    steps_per_epoch: int,
    epochs: int,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule | None = None,
) -> keras.optimizers.Optimizer:
    """A Keras optimizer. `weight_decay` is decoupled unless `l2_kernels_only` moves it into the loss.
    `learning_rate` replaces the configured schedule (the learning-rate finder's ramp)."""
    build = OPTIMIZERS.get(opt_cfg.name)
    if build is None:
        raise ValueError(f"optimizer.name={opt_cfg.name}")  # validate() refuses this earlier
    common = {
        "learning_rate": (
            build_schedule(opt_cfg, sched_cfg, steps_per_epoch, epochs) if learning_rate is None else learning_rate
        ),
        "weight_decay": None if opt_cfg.l2_kernels_only or not opt_cfg.weight_decay else opt_cfg.weight_decay,
        # NASNet's and the Inception trainer's clipping is by the global norm of all gradients.
        "global_clipnorm": opt_cfg.clipnorm,
        "use_ema": opt_cfg.ema is not None,
        "ema_momentum": opt_cfg.ema or 0.99,
    }
    optimizer = build(opt_cfg, common)
    if optimizer.use_ema:
        warm_up_ema(optimizer)
    return optimizer


def warm_up_ema(optimizer: keras.optimizers.Optimizer) -> None:
    """Average the weights with momentum min(ema, (1 + step) / (10 + step)), the warm-up of the Inception
    trainer's `ExponentialMovingAverage(decay, global_step)`: 0.5 after 8 steps, 0.9 after 80, 0.99 after 890.

    Keras's `ema_momentum` is a constant, so with 0.9999 a run of a few hundred steps would validate and save
    what are still almost the initial weights. Keras has no hook for it: this replaces the one method that
    applies the momentum on this optimizer instance (not a subclass, so checkpoints and logged models keep
    Keras's own optimizer class and load anywhere). Call it again on an optimizer loaded from a checkpoint.
    """
    from keras import ops

    decay = float(optimizer.ema_momentum)

    def update(trainable_variables: list) -> None:
        step = ops.cast(optimizer.iterations, "float32")
        # Step 0 copies the weights: Keras's averages start at zero (its own rule does the same).
        momentum = ops.where(step > 0, ops.minimum(decay, (1.0 + step) / (10.0 + step)), 0.0)
        for variable, average in zip(trainable_variables, optimizer._model_variables_moving_average, strict=True):
            if average is not None:
                m = ops.cast(momentum, variable.dtype)
                average.assign(m * average + (1.0 - m) * variable)

    if not hasattr(optimizer, "_update_model_variables_moving_average"):  # a Keras release renamed it
        raise RuntimeError("this Keras has no _update_model_variables_moving_average: optimizer.ema cannot warm up")
    optimizer._update_model_variables_moving_average = update


def _momentum(opt_cfg: DictConfig, common: dict[str, Any]) -> keras.optimizers.Optimizer:
    import keras

    return keras.optimizers.SGD(momentum=opt_cfg.momentum, nesterov=False, **common)


def _nesterov(opt_cfg: DictConfig, common: dict[str, Any]) -> keras.optimizers.Optimizer:
    import keras

    return keras.optimizers.SGD(momentum=opt_cfg.momentum, nesterov=True, **common)


def _rmsprop(opt_cfg: DictConfig, common: dict[str, Any]) -> keras.optimizers.Optimizer:
    import keras

    return keras.optimizers.RMSprop(rho=opt_cfg.rho, momentum=opt_cfg.momentum, epsilon=opt_cfg.epsilon, **common)


def _adam(opt_cfg: DictConfig, common: dict[str, Any]) -> keras.optimizers.Optimizer:
    import keras

    return keras.optimizers.Adam(beta_1=opt_cfg.beta_1, beta_2=opt_cfg.beta_2, epsilon=opt_cfg.epsilon, **common)


def _adamw(opt_cfg: DictConfig, common: dict[str, Any]) -> keras.optimizers.Optimizer:
    import keras

    if common["weight_decay"] is None:  # AdamW always decays; 0.0 when l2_kernels_only moved it to the loss
        common = {**common, "weight_decay": 0.0}
    return keras.optimizers.AdamW(beta_1=opt_cfg.beta_1, beta_2=opt_cfg.beta_2, epsilon=opt_cfg.epsilon, **common)


# optimizer.name -> builder (the name's YAML file in conf/optimizer/ holds its keys); validation reads it.
OPTIMIZERS: dict[str, Callable[[DictConfig, dict[str, Any]], keras.optimizers.Optimizer]] = {
    "momentum": _momentum,
    "nesterov": _nesterov,
    "rmsprop": _rmsprop,
    "adam": _adam,
    "adamw": _adamw,
}
