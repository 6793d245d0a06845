"""`workbench predict`: a logged model's top classes, by name, for raw image files.

The model's metadata (tracking.log_model) say how to feed it: the input size, the architecture whose
preprocessing applies, and the class names in output order. Files are decoded and resized as validation
images are in training (RGB, bilinear, aspect ratio not kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench import readable
from workbench.config import RUN_ID, ConfigError, first_line, mlflow_reference, redact, sqlalchemy_url
from workbench.sources import SUFFIXES

BATCH = 64


@dataclass(frozen=True)
class Prediction:
    file: Path
    top: list[tuple[str, float]]  # (class name, probability), most likely first


def model_uri(reference: str) -> str:
    """A run id stands for that run's logged model; runs:/ and models:/ URIs pass as they are."""
    if mlflow_reference(reference):
        return f"runs:/{reference}/model" if RUN_ID.fullmatch(reference) else reference
    raise ConfigError(
        f"{reference}: not a run id or a model URI; give a run id, runs:/<run id>/model or models:/<name>@<alias>"
    )


def image_files(paths: Sequence[str]) -> list[Path]:
    """The files given, and the image files under the folders given (recursively), in order."""
    found: list[Path] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{text}: no such file or folder")
    if not found:
        raise ConfigError(f"{' '.join(paths)}: no image files (JPEG, PNG, GIF, BMP) there")
    return found


def use_store(tracking_uri: str | None) -> str:
    """Point MLflow at the given store, else at its own (MLFLOW_TRACKING_URI or ./mlflow.db, which must exist
    here); return the store's URI with any password hidden. For commands that read runs, never create them."""
    import os

    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(sqlalchemy_url(tracking_uri))
    elif not os.environ.get("MLFLOW_TRACKING_URI") and not Path("mlflow.db").is_file():
        # MLflow would create an empty store here and then find nothing in it.
        raise ConfigError("no mlflow.db here: run where you trained, or give --tracking-uri (or MLFLOW_TRACKING_URI)")
    return redact(mlflow.get_tracking_uri())


def model_metadata(uri: str) -> dict[str, Any]:
    """The metadata of the logged model behind `uri` in MLflow's current store (class names, input size,
    architecture); ConfigError when there is no model, or one without class names."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        metadata = mlflow.models.get_model_info(uri).metadata or {}
    except (MlflowException, OSError) as exc:
        reason = first_line(exc)
        raise ConfigError(
            f"{uri}: no logged model there in {redact(mlflow.get_tracking_uri())} ({reason}); "
            "runs log one unless tracking.log_model=false"
        ) from None
    if "class_names" not in metadata:
        raise ConfigError(f"{uri}: the model has no class names in its metadata (logged by an older workbench)")
    return metadata


def load(uri: str, tracking_uri: str | None) -> tuple[Any, dict[str, Any]]:
    """The Keras model behind `uri` in the given store (else MLflow's: MLFLOW_TRACKING_URI or ./mlflow.db)
    and its metadata; ConfigError when there is none to predict with."""
    import mlflow

    use_store(tracking_uri)
    metadata = model_metadata(uri)
    return mlflow.keras.load_model(uri), metadata


def predict(model: Any, metadata: dict[str, Any], files: list[Path], top: int) -> tuple[list[Prediction], list[str]]:
    """The top classes of each readable file, and a line for each file that is not an image."""
    import numpy as np
    import tensorflow as tf

    from workbench import augment, models

    size = int(metadata["input_size"])
    names = list(metadata["class_names"])
    preprocess = models.preprocessor(str(metadata["architecture"]))
    readable_files, skipped = [], []
    for file in files:
        why = readable.why_unreadable(file)
        if why is None:
            readable_files.append(file)
        else:
            skipped.append(f"skipped {file}: {why}")
    k = min(top, len(names))
    predictions = []
    for start in range(0, len(readable_files), BATCH):  # a folder of any size, a batch in memory at a time
        batch = readable_files[start : start + BATCH]
        images = [
            augment.resize(tf.io.decode_image(tf.io.read_file(str(f)), channels=3, expand_animations=False), size)
            for f in batch
        ]
        probabilities = np.asarray(model.predict(preprocess(tf.stack(images)), verbose=0))
        for file, row in zip(batch, probabilities, strict=True):
            best = np.argsort(-row, kind="stable")[:k]
            predictions.append(Prediction(file, [(names[i], float(row[i])) for i in best]))
    return predictions, skipped
