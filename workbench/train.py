"""The shared trainer: one function trains any composed config, for `run.py` and for every study trial."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from workbench import models, signals, sources
from workbench.checkpoints import CheckpointDir, State
from workbench.config import config_hash, redacted_yaml, validate

# MLflow and TensorFlow load only once the config and data have been checked: a refusal answers at once.
if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from workbench.callbacks import ReportFn
    from workbench.data import Pipelines
    from workbench.outbox import Outbox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """How the config was put together, which the config itself does not say: the config-group choices
    (`recipe` is tagged), the overrides it was composed from, and Hydra's output subfolder (`.hydra`) when
    the run is a Hydra job of its own. The caller knows these; the trainer logs them."""

    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    hydra_dir: Path | None = None


@dataclass(frozen=True)
class Result:
    """The MLflow run a training went to, and the latest value of each of its metrics."""

    run_id: str
    metrics: dict[str, float]
    unsent: bool = False  # the tracking store was away at the end: `workbench sync` sends the rest


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where the epoch checkpoint lives: fixed by the config, so the same command finds it again."""
    if cfg.trainer.checkpoint_dir:
        return Path(str(cfg.trainer.checkpoint_dir)).expanduser()
    return Path("checkpoints") / f"{cfg.tracking.experiment}-{config_hash(cfg)}"


def train(
    cfg: DictConfig,
    context: RunContext | None = None,
    report: ReportFn | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_run_start: Callable[[str], None] | None = None,
) -> Result:
    """Train the configured model, tracked in MLflow; return the run and its final epoch's metrics.

    `context` says how the config was composed (none: a config built in code). `report(step, metrics)` is
    called after every epoch (step = epoch, from 1) and stops training by returning True (studies prune
    with it); with `trainer.cv_folds`, after every fold instead (workbench/cv.py). `parent_run_id`
    and `tags` attach the MLflow run to a study; `on_run_start(run_id)` learns the run as soon as it is open.
    Besides the per-epoch metrics, the result holds `parameters`, the model's parameter count; with
    `trainer.cv_folds`, the run is the CV run and each metric is its mean over the folds.
    """
    context = context or RunContext()
    validate(cfg)
    size = models.input_size(cfg.model)
    source = sources.load(cfg.data, size)
    if cfg.trainer.cv_folds:
        from workbench import cv

        return cv.cross_validate(cfg, context, source, size, report, parent_run_id, tags, on_run_start)
    sources.check_batch_size(source, cfg.trainer.batch_size)
    ckpt = CheckpointDir(checkpoint_dir(cfg))
    with ckpt.in_use():  # a second run of the same config is refused here, before it writes anything
        return train_one(cfg, context, source, size, ckpt, ckpt.path.parent, report, parent_run_id, tags, on_run_start)


def train_one(
    cfg: DictConfig,
    context: RunContext,
    source: sources.Source,
    size: int,
    ckpt: CheckpointDir,
    outbox_root: Path,
    report: ReportFn | None,
    parent_run_id: str | None,
    tags: dict[str, str] | None,
    on_run_start: Callable[[str], None] | None = None,
) -> Result:
    """One model trained on `source` into one MLflow run, from (or on from) the epoch checkpoint in `ckpt`,
    which the caller holds; the run's outbox goes under `outbox_root`."""
    import mlflow

    from workbench import tracking

    state = State()
    if cfg.trainer.resume and ckpt.exists():
        state = ckpt.resume_state()
        log.info("Resuming from %s after epoch %d (MLflow run %s)", ckpt.path, state.epoch, state.run_id)
    else:
        if cfg.trainer.resume:
            log.info("No checkpoint in %s: starting from scratch", ckpt.path)
        ckpt.clear()
    experiment_id = tracking.configure(cfg.tracking)  # a server that refuses us fails before TensorFlow loads

    # Weights from an MLflow run or registered model are fetched before TensorFlow loads; a resume has its own.
    weights = contextlib.nullcontext(cfg.model) if state.epoch else tracking.local_weights(cfg.model)
    with weights as model_cfg, keras_session(cfg.trainer) as strategy:
        model, pipelines = _prepare(cfg, model_cfg, source, size, ckpt, state, strategy)
        run_tags = tracking.run_tags(cfg, context.choices, context.overrides, config_hash(cfg)) | (tags or {})
        with tracking.run(
            cfg.tracking,
            experiment_id,
            outbox_root,
            run_id=state.run_id,
            parent_run_id=parent_run_id,
            tags=run_tags,
        ) as box:
            if on_run_start is not None:
                on_run_start(box.run_id)
            if state.run_id is None:
                log_config(cfg, context)
                tracking.log_dataset(source.name, source.uri, source.digest)
                tracking.log_class_names(source.class_names)
                if source.skipped:  # counted in the log by the scan; named here
                    mlflow.log_text(sources.skipped_files_text(source), "skipped_files.txt")
                mlflow.log_metric("parameters", model.count_params())
                state.run_id = box.run_id
            elif state.metrics:
                tracking.log_epoch_if_missing(box, state.metrics, state.epoch)
            _fit(cfg, model, pipelines, ckpt, state, report, box)
            _log_outputs(cfg, model, ckpt, box, size, source.class_names)
        # The last epoch's metrics, as logged, whether or not the store has them yet.
        metrics = {"parameters": float(model.count_params()), **(state.metrics or {})}
        return Result(box.run_id, metrics, unsent=box.pending() > 0)


def log_config(cfg: DictConfig, context: RunContext) -> None:
    """The `config/` artifacts: Hydra's own files for a Hydra job; else (a study trial, composed with the
    compose API) the resolved config and the overrides it was composed from."""
    import mlflow

    from workbench import tracking

    tracking.log_config(cfg, context.hydra_dir)
    if context.hydra_dir is None and context.overrides:
        overrides = OmegaConf.create(list(context.overrides))
        mlflow.log_text(redacted_yaml(overrides, resolve=False), "config/overrides.yaml")


def _prepare(
    cfg: DictConfig,
    model_cfg: DictConfig,
    source: sources.Source,
    size: int,
    ckpt: CheckpointDir,
    state: State,
    strategy: tf.distribute.Strategy,
) -> tuple[keras.Model, Pipelines]:
    import keras

    from workbench import data, optim
    from workbench.checkpoints import restore_rng

    pipelines = data.build(source, cfg, size, models.preprocessor(cfg.model.name), initial_epoch=state.epoch)
    with strategy.scope():
        if state.epoch:
            model = keras.saving.load_model(ckpt.last)
            restore_rng(model, state.rng)
            _add_l2(model, cfg.optimizer)
        else:
            model = build_model(cfg, model_cfg, source.num_classes, pipelines.steps_per_epoch)
        if cfg.optimizer.ema is not None and state.epoch:
            optim.warm_up_ema(model.optimizer)  # a method of the instance, so not in the checkpoint
    return model, pipelines


def build_model(
    cfg: DictConfig,
    model_cfg: DictConfig,
    num_classes: int,
    steps_per_epoch: int,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule | None = None,
) -> keras.Model:
    """A new model, compiled as the trainer trains it, inside the caller's distribution scope.
    `learning_rate` replaces the configured schedule (the learning-rate finder's ramp)."""
    import keras

    from workbench import optim

    model = models.build(model_cfg, num_classes)
    if cfg.trainer.freeze_epochs:  # the optimizer is built for both phases (callbacks.Unfreeze)
        models.unfreeze(model.get_layer("backbone"), model_cfg.freeze)
    optimizer = optim.build_optimizer(
        cfg.optimizer, cfg.schedule, steps_per_epoch, cfg.trainer.epochs, learning_rate=learning_rate
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.trainer.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            # With 5 classes or fewer every label is in the top 5: a constant 1.0, so not logged.
            *([keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy")] if num_classes > 5 else []),
        ],
        jit_compile=models.jit_compile(cfg.model.jit_compile),
    )
    # Without a distribution strategy Keras creates the optimizer's slots inside the first traced
    # step, and TensorFlow then traces that step a second time; built here, it is traced once
    # (NASNetLarge: half a minute saved).
    model.optimizer.build(model.trainable_variables)
    _add_l2(model, cfg.optimizer)
    return model


def _add_l2(model: keras.Model, opt_cfg: DictConfig) -> None:
    if opt_cfg.l2_kernels_only and opt_cfg.weight_decay:
        models.add_kernel_l2(model, opt_cfg.weight_decay)


def _fit(
    cfg: DictConfig,
    model: keras.Model,
    pipelines: Pipelines,
    ckpt: CheckpointDir,
    state: State,
    report: ReportFn | None,
    box: Outbox,
) -> None:
    import keras

    from workbench.callbacks import Checkpointer, EpochMetrics, MlflowEpochs, Report, Unfreeze

    uploads = cfg.tracking.checkpoints
    callbacks = [
        EpochMetrics(cfg.trainer.batch_size, pipelines.steps_per_epoch),
        # Report to the study before the checkpoint, so a retry that resumes from it never leaves an
        # epoch unreported; checkpoint before logging, so MLflow's epochs always have one to resume from.
        *([Report(report)] if report is not None else []),
        # Before the checkpoint, which must hold the second phase's flags (see Unfreeze).
        *([Unfreeze(cfg.model.freeze, cfg.trainer.freeze_epochs)] if cfg.trainer.freeze_epochs else []),
        Checkpointer(
            ckpt,
            state,
            cfg.tracking.monitor,
            cfg.tracking.monitor_mode,
            keep_best=uploads in ("best", "best_and_last"),
            keep_every=uploads == "every_epoch",
        ),
        MlflowEpochs(box, ckpt if uploads == "every_epoch" else None),
        # A stop whose KeyboardInterrupt Python swallowed (it landed in a garbage-collection callback)
        # still ends training, at the next batch's start (batch-end hooks would turn off Keras's async dispatch).
        keras.callbacks.LambdaCallback(
            on_train_batch_begin=lambda *_, **__: signals.check(),
            on_test_batch_begin=lambda *_, **__: signals.check(),
        ),
    ]
    if cfg.optimizer.ema is not None:
        # Validation sees the averaged weights; checkpoints keep the raw ones (plus the average) for resume.
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=False))
    with warnings.catch_warnings():
        # Validation over image files has no known length (unreadable files are skipped); Keras warns
        # when it finds the end, which is expected here. The training stream never ends.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        model.fit(
            pipelines.train,
            epochs=cfg.trainer.epochs,
            initial_epoch=state.epoch,
            steps_per_epoch=pipelines.steps_per_epoch,
            validation_data=pipelines.val,
            shuffle=False,  # the pipeline shuffles, reproducibly per epoch
            callbacks=callbacks,
            verbose=1 if sys.stdout.isatty() else 2,
        )


def _log_outputs(
    cfg: DictConfig, model: keras.Model, ckpt: CheckpointDir, box: Outbox, size: int, class_names: list[str]
) -> None:
    uploads = cfg.tracking.checkpoints
    if uploads in ("last", "best_and_last") and ckpt.last.exists():
        box.artifact(ckpt.last, "checkpoints")
    if uploads in ("best", "best_and_last") and ckpt.best.exists():
        box.artifact(ckpt.best, "checkpoints")
    box.curves()
    if cfg.tracking.log_model:
        box.model(model, ckpt.last, size, class_names, cfg.model.name)


@contextlib.contextmanager
def keras_session(trainer_cfg: DictConfig) -> Iterator[tf.distribute.Strategy]:
    """Seeds, determinism, precision policy and distribution for one run.

    The precision policy and Keras's state are reset afterwards. Op determinism is not: TensorFlow has no
    public way to turn it off again, so once a run asks for it, it stays on for the rest of the process
    (later runs in a study worker are deterministic too, and no slower on CPU).
    """
    import keras
    import tensorflow as tf

    keras.backend.clear_session(free_memory=False)  # the previous run, if any, collected its garbage on the way out
    keras.utils.set_random_seed(trainer_cfg.seed)
    if trainer_cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    policy = {"none": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
    keras.mixed_precision.set_global_policy(policy[trainer_cfg.mixed_precision])
    strategy = (
        tf.distribute.MirroredStrategy() if trainer_cfg.distribute == "mirrored" else tf.distribute.get_strategy()
    )
    gradients = _gradient_registry()
    registered = set(gradients)
    try:
        yield strategy
    finally:
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()
        # Each trace of Keras's train step registers a tf.custom_gradient function (the optimizer's
        # gradient all-reduce) in TensorFlow's global registry, which keeps the traced graphs alive forever:
        # about 13 MB a run for small_cnn, in a process that trains many times (a study worker).
        for name in set(gradients) - registered:
            gradients.pop(name, None)


@functools.cache
def _gradient_registry() -> dict:
    """TensorFlow's registry of gradient functions, private: no public API lists or removes them. Should a
    TensorFlow release move it, training goes on with one warning, keeping its traced graphs in memory."""
    try:
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry._registry
        if not isinstance(registry, dict):
            raise TypeError(f"a {type(registry).__name__}, not a dict")
    except (ImportError, AttributeError, TypeError) as exc:
        log.warning(
            "Cannot free the graphs of finished runs (TensorFlow's gradient registry: %s): a process that trains "
            "many times (a study worker) grows by some MB a run",
            exc,
        )
        return {}
    return registry
