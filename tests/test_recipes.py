"""Each recipe composes to the published setup of DESIGN.md's table: groups, hyper-parameters, learning rates."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig

from helpers import CONF, compose_config, run_cli
from workbench import models
from workbench.config import ConfigError, validate
from workbench.optim import build_optimizer

STEPS = 100  # steps per epoch: epoch e starts at step 100 * e
TESTED = {"nasnet_large_imagenet", "inception_v3_imagenet", "inception_v3_finetune", "resnet50_imagenet"}


def optimizer_for(cfg: DictConfig):
    return build_optimizer(cfg.optimizer, cfg.schedule, STEPS, cfg.trainer.epochs)


def lr_at(optimizer, step: int) -> float:
    """The learning rate the optimizer applies at `step` (its schedule evaluated at its own iteration count)."""
    optimizer.iterations.assign(step)
    return float(optimizer.learning_rate)


def approx(value: float):
    return pytest.approx(value, rel=1e-5)  # schedules compute in float32


def test_every_recipe_is_tested_here() -> None:
    assert {p.stem for p in (CONF / "recipe").glob("*.yaml")} == TESTED


@pytest.mark.parametrize("recipe", sorted(TESTED - {"inception_v3_finetune"}))
def test_recipe_validates(recipe: str) -> None:
    validate(compose_config([f"recipe={recipe}"]))


def test_nasnet_large_imagenet() -> None:
    cfg = compose_config(["recipe=nasnet_large_imagenet"])
    assert (cfg.model.name, models.input_size(cfg.model)) == ("nasnet_large", 331)
    assert (cfg.optimizer.name, cfg.schedule.name, cfg.augmentation.name) == ("momentum", "exponential", "flip_crop")
    assert cfg.model.dropout == 0.5
    assert (cfg.trainer.batch_size, cfg.trainer.epochs, cfg.trainer.label_smoothing) == (64, 100, 0.1)
    # TF-slim's setup: weight decay 5e-5 as an L2 loss on kernels, so not the optimizer's decoupled decay.
    assert (cfg.optimizer.weight_decay, cfg.optimizer.l2_kernels_only) == (5e-5, True)

    opt = optimizer_for(cfg)
    assert type(opt).__name__ == "SGD"
    assert opt.momentum == approx(0.9) and opt.nesterov is False
    assert opt.global_clipnorm == 10.0
    assert opt.weight_decay is None
    assert opt.use_ema is False
    # x0.97 every 2.4 epochs = every 240 steps, in stairs.
    assert lr_at(opt, 0) == approx(0.045)
    assert lr_at(opt, 239) == approx(0.045)
    assert lr_at(opt, 240) == approx(0.045 * 0.97)
    assert lr_at(opt, 479) == approx(0.045 * 0.97)
    assert lr_at(opt, 480) == approx(0.045 * 0.97**2)
    assert lr_at(opt, 99 * STEPS) == approx(0.045 * 0.97**41)  # epoch 99: 9900 // 240 = 41 decays


def test_inception_v3_imagenet() -> None:
    cfg = compose_config(["recipe=inception_v3_imagenet"])
    assert (cfg.model.name, models.input_size(cfg.model)) == ("inception_v3", 299)
    assert (cfg.optimizer.name, cfg.schedule.name, cfg.augmentation.name) == ("rmsprop", "exponential", "inception")
    assert cfg.trainer.batch_size == 32
    assert cfg.model.weights is None

    opt = optimizer_for(cfg)
    assert type(opt).__name__ == "RMSprop"
    assert (opt.rho, opt.momentum, opt.epsilon) == (approx(0.9), approx(0.9), approx(1.0))
    assert opt.use_ema is True and opt.ema_momentum == approx(0.9999)
    assert opt.global_clipnorm is None
    # 0.1, x0.16 every 30 epochs, staircase.
    assert lr_at(opt, 0) == approx(0.1)
    assert lr_at(opt, 15 * STEPS) == approx(0.1)
    assert lr_at(opt, 30 * STEPS - 1) == approx(0.1)
    assert lr_at(opt, 30 * STEPS) == approx(0.016)
    assert lr_at(opt, 60 * STEPS - 1) == approx(0.016)
    assert lr_at(opt, 60 * STEPS) == approx(0.1 * 0.16**2)


def test_inception_v3_finetune_composes_with_a_low_learning_rate() -> None:
    cfg = compose_config(["recipe=inception_v3_finetune", "model.weights=imagenet"])
    validate(cfg)
    assert cfg.model.name == "inception_v3" and cfg.trainer.batch_size == 32
    opt = optimizer_for(cfg)
    # The optimizer of inception_v3_imagenet, at 0.001.
    assert type(opt).__name__ == "RMSprop"
    assert (opt.rho, opt.momentum, opt.epsilon) == (approx(0.9), approx(0.9), approx(1.0))
    assert opt.use_ema is True and opt.ema_momentum == approx(0.9999)
    assert lr_at(opt, 0) == approx(0.001)
    assert lr_at(opt, 30 * STEPS) == approx(0.001 * 0.16)


def test_inception_v3_finetune_requires_weights() -> None:
    with pytest.raises(ConfigError, match=r"^model\.weights: required"):
        validate(compose_config(["recipe=inception_v3_finetune"]))


def test_inception_v3_finetune_without_weights_is_a_usage_error(workdir: Path) -> None:
    result = run_cli(["recipe=inception_v3_finetune"], cwd=workdir, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: model.weights: required"), lines[0]
    assert "model.weights=" in lines[0]  # says how to give one
    assert not (workdir / "mlflow.db").exists()  # refused before any run, let alone a model


def test_resnet50_imagenet() -> None:
    cfg = compose_config(["recipe=resnet50_imagenet"])
    assert (cfg.model.name, models.input_size(cfg.model)) == ("resnet50", 224)
    assert (cfg.optimizer.name, cfg.schedule.name) == ("nesterov", "cosine")
    assert (cfg.trainer.batch_size, cfg.trainer.epochs, cfg.trainer.label_smoothing) == (128, 50, 0.1)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.l2_kernels_only) == (1e-4, True)

    opt = optimizer_for(cfg)
    assert type(opt).__name__ == "SGD"
    assert opt.momentum == approx(0.9) and opt.nesterov is True
    assert opt.weight_decay is None  # L2 on kernels, in the loss
    assert opt.use_ema is False and opt.global_clipnorm is None
    last = cfg.trainer.epochs * STEPS - 1
    # Linear warm-up over the first epoch to 0.05 ...
    assert lr_at(opt, 0) == pytest.approx(0.0, abs=1e-9)
    assert lr_at(opt, STEPS // 2) == approx(0.025)
    assert lr_at(opt, STEPS) == approx(0.05)
    # ... then a cosine from 0.05 down to the minimum, 0, at the last step.
    middle = STEPS + (last + 1 - STEPS) // 2
    assert lr_at(opt, middle) == pytest.approx(0.025, rel=1e-3)
    rates = [lr_at(opt, step) for step in range(STEPS, last + 1, 250)]
    assert rates == sorted(rates, reverse=True)
    assert lr_at(opt, last) < 1e-6


def test_command_line_beats_recipe() -> None:
    cfg = compose_config(["recipe=nasnet_large_imagenet", "optimizer.learning_rate=0.01", "trainer.batch_size=8"])
    assert cfg.optimizer.learning_rate == 0.01 and cfg.trainer.batch_size == 8
    # The rest of the recipe stays.
    assert (cfg.model.name, cfg.model.dropout, cfg.trainer.epochs, cfg.optimizer.clipnorm) == (
        "nasnet_large",
        0.5,
        100,
        10.0,
    )
    opt = optimizer_for(cfg)
    assert lr_at(opt, 0) == approx(0.01)
    assert lr_at(opt, 240) == approx(0.01 * 0.97)


def test_command_line_group_choice_beats_recipe() -> None:
    cfg = compose_config(["recipe=resnet50_imagenet", "model=mobilenet_v2"])
    assert cfg.model.name == "mobilenet_v2"
    assert cfg.optimizer.name == "nesterov" and cfg.trainer.batch_size == 128
