"""Optimizers and learning-rate schedules, with every epoch quantity converted to steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras
    from omegaconf import DictConfig


def build_schedule(
    opt_cfg: DictConfig, sched_cfg: DictConfig, steps_per_epoch: int, epochs: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate at every step. Epochs become steps with the real steps per epoch:
    decaying every 2.4 epochs means every 2.4 x steps_per_epoch steps."""
    import keras

    schedules = keras.optimizers.schedules
    lr = float(opt_cfg.learning_rate)
    name = sched_cfg.name
    if name == "constant":
        return lr
    if name == "exponential":
        return schedules.ExponentialDecay(
            lr,
            decay_steps=sched_cfg.epochs_per_decay * steps_per_epoch,
            decay_rate=sched_cfg.decay_factor,
            staircase=sched_cfg.staircase,
        )
    if name == "cosine":
        warmup_steps = int(round(sched_cfg.warmup_epochs * steps_per_epoch))
        decay_steps = max(1, epochs * steps_per_epoch - warmup_steps)
        alpha = sched_cfg.min_learning_rate / lr
        if warmup_steps == 0:
            return schedules.CosineDecay(lr, decay_steps, alpha=alpha)
        return schedules.CosineDecay(0.0, decay_steps, alpha=alpha, warmup_target=lr, warmup_steps=warmup_steps)
    if name == "piecewise":
        boundaries = [int(round(b * steps_per_epoch)) for b in sched_cfg.boundaries_epochs]
        values = [lr * sched_cfg.decay_factor**i for i in range(len(boundaries) + 1)]
        return schedules.PiecewiseConstantDecay(boundaries, values)
    raise ValueError(f"schedule.name={name}")  # validate() refuses this earlier


def build_optimizer(
    opt_cfg: DictConfig, sched_cfg: DictConfig, steps_per_epoch: int, epochs: int
) -> keras.optimizers.Optimizer:
    """A Keras optimizer. `weight_decay` is decoupled unless `l2_kernels_only` moves it into the loss."""
    import keras

    common = {
        "learning_rate": build_schedule(opt_cfg, sched_cfg, steps_per_epoch, epochs),
        "weight_decay": None if opt_cfg.l2_kernels_only or not opt_cfg.weight_decay else opt_cfg.weight_decay,
        # NASNet's and the Inception trainer's clipping is by the global norm of all gradients.
        "global_clipnorm": opt_cfg.clipnorm,
        "use_ema": opt_cfg.ema is not None,
        "ema_momentum": opt_cfg.ema or 0.99,
    }
    name = opt_cfg.name
    if name in ("momentum", "nesterov"):
        return keras.optimizers.SGD(momentum=opt_cfg.momentum, nesterov=name == "nesterov", **common)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(rho=opt_cfg.rho, momentum=opt_cfg.momentum, epsilon=opt_cfg.epsilon, **common)
    if name in ("adam", "adamw"):
        cls = keras.optimizers.AdamW if name == "adamw" else keras.optimizers.Adam
        if name == "adamw" and common["weight_decay"] is None:
            common["weight_decay"] = 0.0
        return cls(beta_1=opt_cfg.beta_1, beta_2=opt_cfg.beta_2, epsilon=opt_cfg.epsilon, **common)
    raise ValueError(f"optimizer.name={name}")  # validate() refuses this earlier
