"""`workbench eval`: how well a model classifies a data split, logged to MLflow beside its training.

What is evaluated:
- no data overrides: the run's own validation split, from the data config the run logged
  (`config/config.yaml`). Sources split with a fixed seed, so these are the examples validation saw.
  A bare checkpoint file has no run: the default data's (digits') validation split.
- data overrides (`data=image_folder data.path=~/holdout`, or `data.path=...` over the run's own source):
  every example of that source, its training and validation splits together, since a held-out source is
  one the model never trained on. With `data.val_fraction=F` among them, only that source's validation
  split. Overrides that name the run's own data again give its validation split.

Views of each image: `--crops 1` is validation's (resized to size x size, aspect ratio not kept, then the
architecture's preprocessing). `--crops 10` is the ResNet and Inception papers' 10-crop evaluation: the
image resized, aspect ratio kept, so that its shorter side is round(size / 0.875) (224 -> 256, 299 -> 342),
the four corner crops and the centre crop of size x size, and their mirror images; the ten probability
vectors are averaged.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from workbench import eval_data, eval_report
from workbench.config import ConfigError, first_line

if TYPE_CHECKING:
    import numpy as np

    from workbench.sources import Source, Split

CROPS = (1, 10)
CENTRAL_FRACTION = 0.875  # the crop's share of the resized shorter side (224 of 256)


@dataclass(frozen=True)
class Outcome:
    report: eval_report.Report
    data: str  # what was evaluated, in words
    run_id: str  # where it was logged
    new_run: bool  # a run made for this evaluation (a checkpoint file), not the model's own
    artifact_path: str


def option(name: str, text: str, allowed: Sequence[int] | None = None) -> int:
    """A whole-number command-line option (`--crops`, `--batch-size`), refused in one line."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if allowed is not None and value not in allowed:
        raise ConfigError(
            f"{name} {text}: must be 1 (the validation resize) or 10 (four corners and the centre, each mirrored)"
        )
    if value < 1:
        raise ConfigError(f"{name} {text}: must be a whole number of at least 1")
    return value


def evaluate(
    reference: str,
    overrides: Sequence[str],
    crops: int = 1,
    batch_size: int = 64,
    tracking_uri: str | None = None,
) -> Outcome:
    """Evaluate the model `reference` names (a run id, runs:/ or models:/ URI, or a .keras file) and log
    the result to its run (a new run for a file); ConfigError for anything it cannot evaluate."""
    if crops not in CROPS:
        raise ConfigError(f"--crops {crops}: must be 1 or 10")
    eval_data.check_overrides(overrides)
    path = Path(reference).expanduser()
    if reference.endswith(".keras") or path.is_file():
        return _evaluate_file(reference, path, overrides, crops, batch_size, tracking_uri)
    return _evaluate_logged(reference, overrides, crops, batch_size, tracking_uri)


def _evaluate_logged(
    reference: str, overrides: Sequence[str], crops: int, batch_size: int, tracking_uri: str | None
) -> Outcome:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from workbench import predict

    uri = predict.model_uri(reference)
    store = predict.use_store(tracking_uri)
    client = MlflowClient()
    run_id: str | None = None
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/")[0]
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ConfigError(f"{reference}: no run {run_id} in {store}") from None
    metadata = predict.model_metadata(uri)
    if run_id is None:  # a registered model: its version's source run, when it has one
        run_id = mlflow.models.get_model_info(uri).run_id or None
    own = eval_data.run_data(run_id) if run_id else None
    if run_id and own is None and not eval_data.names_data(overrides):
        raise ConfigError(
            f"{reference}: run {run_id} logged no config/config.yaml with its data, so its validation split "
            "is unknown; name the data to evaluate on, e.g. data=image_folder data.path=~/holdout"
        )
    data_cfg, split = eval_data.data_config(overrides, own)
    size = int(metadata["input_size"])
    source = eval_data.load_source(data_cfg, size, split == eval_data.OWN_SPLIT and run_id is not None)
    eval_data.check_classes(list(metadata["class_names"]), source, reference)
    model = mlflow.keras.load_model(uri)
    architecture = str(metadata["architecture"])
    report = _report(model, architecture, size, source, split, crops, batch_size)
    details = eval_data.details(reference, source, split, crops, architecture, size)
    if run_id is None:
        tags = {"workbench.model": uri, "model": architecture}
        run_id = _log_to_new_run(report, details, tags, f"eval-{eval_data.key(uri)}", tracking_uri)
        return Outcome(report, eval_data.described(source, split), run_id, True, _artifact_path(report))
    _log(client, run_id, report, details)
    return Outcome(report, eval_data.described(source, split), run_id, False, _artifact_path(report))


def _evaluate_file(
    reference: str, path: Path, overrides: Sequence[str], crops: int, batch_size: int, tracking_uri: str | None
) -> Outcome:
    from workbench.models import ARCHITECTURES

    if not path.is_file():
        raise ConfigError(f"{reference}: no such file; give a run id, a model URI or a .keras checkpoint")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{reference}: not a Keras archive (.keras); give a checkpoint saved by Keras 3")
    data_cfg, split = eval_data.data_config(overrides, None)  # refused before TensorFlow loads
    import keras

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a damaged or foreign archive
        raise ConfigError(f"{reference}: Keras cannot load it ({first_line(exc)})") from None
    # The workbench names each model after its architecture (models.build).
    architecture, size = model.name, model.input_shape[1]
    if architecture not in ARCHITECTURES or not isinstance(size, int):
        raise ConfigError(f"{reference}: not a workbench model (named {architecture}); its preprocessing is unknown")
    source = eval_data.load_source(data_cfg, size, False)
    if model.output_shape[-1] != source.num_classes:
        raise ConfigError(
            f"{reference}: the model has {model.output_shape[-1]} classes and data {source.name} has "
            f"{source.num_classes} ({eval_data.names(source.class_names)}); give data with the model's classes"
        )
    report = _report(model, architecture, size, source, split, crops, batch_size)
    details = eval_data.details(reference, source, split, crops, architecture, size)
    resolved = str(path.resolve())
    tags = {"workbench.checkpoint": resolved, "model": architecture, "data": source.name}
    run_id = _log_to_new_run(report, details, tags, f"eval-{architecture}-{path.stem}", tracking_uri)
    return Outcome(report, eval_data.described(source, split), run_id, True, _artifact_path(report))


def _report(
    model: Any, architecture: str, size: int, source: Source, split: str, crops: int, batch_size: int
) -> eval_report.Report:
    splits = eval_data.splits(source, split)
    labels, probabilities = predictions(model, architecture, splits, source.num_classes, size, crops, batch_size)
    return eval_report.compute(labels, probabilities, source.class_names, eval_data.dataset_name(source, split, crops))


# --- predictions ----------------------------------------------------------------------------------------


def predictions(
    model: Any,
    architecture: str,
    splits: list[Split],
    num_classes: int,
    size: int,
    crops: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(integer labels, class probabilities averaged over the crops) of every example that decodes.
    A batch holds batch_size model inputs: batch_size images with 1 crop, batch_size // 10 with 10."""
    import numpy as np
    import tensorflow as tf

    from workbench import augment, models
    from workbench.data import examples  # validation's own reading, for every kind of source

    preprocess = models.preprocessor(architecture)
    images_per_batch = max(1, batch_size // crops)

    def views(image: tf.Tensor) -> tf.Tensor:
        return augment.resize(image, size)[tf.newaxis] if crops == 1 else ten_crops(image, size)

    labels, probabilities = [], []
    for split in splits:
        if len(split) == 0:
            continue
        dataset = (
            examples(split, num_classes)
            .map(lambda image, label: (views(image), tf.argmax(label)), num_parallel_calls=tf.data.AUTOTUNE)
            .batch(images_per_batch)
            .map(lambda v, y: (preprocess(tf.reshape(v, (-1, size, size, 3))), y), num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
        )
        for inputs, batch_labels in dataset:
            n = int(batch_labels.shape[0])
            output = np.asarray(model.predict_on_batch(inputs), dtype=np.float64)
            probabilities.append(output.reshape(n, crops, -1).mean(axis=1))
            labels.append(batch_labels.numpy())
    if not labels:
        raise ConfigError("no example to evaluate: the data has no image that decodes")
    return np.concatenate(labels).astype(np.int64), np.concatenate(probabilities)


def ten_crops(image: Any, size: int) -> Any:
    """float32 [10, size, size, 3]: the corners and centre of the image resized to shorter side
    round(size / 0.875), aspect ratio kept, then the same five mirrored."""
    import tensorflow as tf

    side = round(size / CENTRAL_FRACTION)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = side / tf.reduce_min(shape)
    height_width = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), side)
    resized = tf.image.resize(tf.cast(image, tf.float32), height_width)
    h, w = height_width[0] - size, height_width[1] - size  # the largest offsets
    corners = [(0, 0), (0, w), (h, 0), (h, w), (h // 2, w // 2)]
    crops = tf.stack([tf.slice(resized, [y, x, 0], [size, size, 3]) for y, x in corners])
    return tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)


# --- MLflow -----------------------------------------------------------------------------------------------


def _artifact_path(report: eval_report.Report) -> str:
    return f"eval/{report.dataset}"


def _log(client: Any, run_id: str, report: eval_report.Report, details: dict[str, Any]) -> None:
    """Metrics and artifacts into an existing run through the client: the run is not resumed, so its
    status (FINISHED, for a finished training) stays as it is."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in eval_report.metrics(report).items()]
    with TemporaryDirectory() as folder:
        eval_report.write(report, Path(folder), details)
        client.log_batch(run_id, metrics=metrics)
        client.log_artifacts(run_id, folder, _artifact_path(report))


def _log_to_new_run(
    report: eval_report.Report, details: dict[str, Any], tags: dict[str, str], name: str, tracking_uri: str | None
) -> str:
    """A run of its own (for a model with no run), in the tracking config's experiment; ended FINISHED,
    or FAILED / KILLED when logging fails, never left RUNNING."""
    from mlflow.tracking import MlflowClient

    from workbench import tracking
    from workbench.study.compose import CONF

    experiment = OmegaConf.load(CONF / "tracking" / "default.yaml").experiment
    experiment_id = tracking.configure(OmegaConf.create({"uri": tracking_uri, "experiment": experiment}))
    client = MlflowClient()
    run = client.create_run(experiment_id, tags={**tags, "workbench.eval": report.dataset}, run_name=name)
    run_id = run.info.run_id
    status = "FAILED"
    try:
        _log(client, run_id, report, details)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run_id, status)
    return run_id
