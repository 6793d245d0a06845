"""MLflow: one run per training, from params to final status, never left RUNNING."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, cast

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from workbench import outbox, signals, system_metrics
from workbench.config import (
    RUN_CONTROL_KEYS,
    ConfigError,
    first_line,
    flatten,
    redact,
    redacted_yaml,
    sqlalchemy_url,
)
from workbench.outbox import Outbox

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)
CURVES = (("loss", "val_loss"), ("accuracy", "val_accuracy"), ("learning_rate",))


def configure(tracking_cfg: DictConfig) -> str:
    """Point MLflow at the configured store and experiment, creating them if need be; return the experiment id."""
    if tracking_cfg.uri:
        mlflow.set_tracking_uri(sqlalchemy_url(str(tracking_cfg.uri)))
    _create_sqlite_store(mlflow.get_tracking_uri())
    try:
        # Runs name this id rather than rely on the active experiment: when parallel jobs create the
        # experiment at once, the one that loses the race gets it back but is left on Default (mlflow 3.17).
        return mlflow.set_experiment(tracking_cfg.experiment).experiment_id
    except MlflowException as exc:
        if exc.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            raise
        raise ConfigError(
            f"tracking.uri={redact(mlflow.get_tracking_uri())}: the server refused access ({exc.error_code}); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        ) from None


def _create_sqlite_store(uri: str) -> None:
    """A new SQLite store is a copy of an empty one made once per MLflow version in the user's cache: MLflow
    would otherwise run its schema migrations on each new file (2.5 s), and two runs started at once in a new
    folder would both run them and one would fail (`duplicate column name`). A lock beside the file makes
    the creation safe."""
    from sqlalchemy.engine import make_url

    from workbench.study.lock import FileLock

    if not uri.startswith("sqlite:"):
        return
    database = make_url(uri).database
    if not database or database == ":memory:" or Path(database).is_file():
        return
    path = Path(database).resolve()
    lock = FileLock(path.with_name(path.name + ".lock"))
    lock.acquire()
    try:
        if path.is_file():  # another process made it while this one waited
            return
        template = _empty_store()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        with contextlib.closing(sqlite3.connect(tmp)) as db, db:
            # The Default experiment's artifacts belong beside this store, as MLflow would have placed them.
            db.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                (str(Path.cwd() / "mlruns" / "0"),),
            )
        os.replace(tmp, path)
    finally:
        lock.release()


def _empty_store() -> Path:
    """The migrated, empty SQLite store of this MLflow version, made once in the user's cache folder."""
    from workbench.study.lock import FileLock

    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "workbench"
    template = folder / f"mlflow-{mlflow.__version__}.db"
    if template.is_file():
        return template
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(template.with_name(template.name + ".lock"))
    lock.acquire()
    try:
        if not template.is_file():
            tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            MlflowClient(f"sqlite:///{tmp}").search_experiments()  # creates and migrates the schema
            os.replace(tmp, template)
    finally:
        lock.release()
    return template


@contextlib.contextmanager
def run(
    tracking_cfg: DictConfig,
    experiment_id: str,
    outbox_root: Path,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Outbox]:
    """Start (or continue, with run_id) a run in the experiment `configure` returned, and yield its outbox
    (under `outbox_root`), through which everything after the start reaches the store; end the run
    FINISHED, FAILED or KILLED. A training that succeeded waits up to `tracking.server_wait_s` for a server
    that is away, then leaves the rest for `workbench sync` with one line saying so."""
    active = mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else run_name(tracking_cfg, tags),
        parent_run_id=parent_run_id,
        nested=mlflow.active_run() is not None,  # a cross-validation fold, inside its CV run
        tags=tags,
    )
    box = Outbox.open(outbox_root, active.info.run_id, mlflow.get_tracking_uri())
    status = "FAILED"
    try:
        box.send()  # what an earlier attempt of this run left unsent goes first
        with signals.stop_on_signals(), _system_metrics(tracking_cfg, box, active.info.start_time):
            yield box  # signals: inside a study worker's scope, the worker's stays in charge
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        signum = signals.received()
        box.tag("workbench.stopped", f"interrupted ({signum.name if signum else 'Ctrl-C'})")
        raise
    except BaseException as exc:
        box.tag("workbench.error", redact(f"{type(exc).__name__}: {exc}")[:5000])
        raise
    finally:
        # A stopped or failed run waits a few seconds at most (a scheduler's grace period is short), enough
        # for a store that is only busy, e.g. a SQLite file the launching process is writing to.
        wait = float(tracking_cfg.server_wait_s)
        _end(box, status, wait if status == "FINISHED" else min(wait, 5.0))


def _system_metrics(tracking_cfg: DictConfig, box: Outbox, started_ms: int) -> contextlib.AbstractContextManager:
    if not tracking_cfg.system_metrics:
        return contextlib.nullcontext()
    interval = float(tracking_cfg.system_metrics_interval_s)
    return system_metrics.sampling(box, interval, started_ms, os.environ.get("CUDA_VISIBLE_DEVICES"))


def run_name(tracking_cfg: DictConfig, tags: dict[str, str] | None) -> str | None:
    """`tracking.run_name`, else `<model>-<optimizer>-<date>-<time>` (rather than MLflow's random words)."""
    name = tracking_cfg.run_name
    if name is None and tags and {"model", "optimizer"} <= tags.keys():
        name = f"{tags['model']}-{tags['optimizer']}-{time.strftime('%Y%m%d-%H%M%S')}"
    return name


def _end(box: Outbox, status: str, patience_s: float) -> None:
    """Send the run's last items and its status; what the store cannot take now stays in the outbox."""
    box.status(status)
    sent = False
    try:
        sent = box.send(patience_s)
    finally:  # a stop while waiting for the server ends the wait, not the outbox
        if not sent:
            # The status was not sent, so MLflow still holds the run active in this process: leave it (MLflow
            # has no other public way; ending it asks the store once more, quickly, and may fail).
            with outbox.no_retries(), contextlib.suppress(Exception):
                mlflow.end_run(status)
            box.unlock()
            log.warning(
                "The tracking store %s is away: run %s ended %s with %d items unsent, kept in %s; "
                "send them with `workbench sync %s`",
                redact(mlflow.get_tracking_uri()),
                box.run_id,
                status,
                box.pending(),
                box.folder,
                box.folder,
            )


@contextlib.contextmanager
def local_weights(model_cfg: DictConfig) -> Iterator[DictConfig]:
    """The model config, with model.weights that name an MLflow run or registered model replaced by a
    downloaded .keras file, deleted afterwards. A run gives its best checkpoint, else its last one, else
    its logged model; `runs:/<id>` and a bare run id are the same."""
    from omegaconf import OmegaConf

    from workbench.config import check_architecture, mlflow_reference

    weights = model_cfg.weights
    if not mlflow_reference(weights):
        yield model_cfg
        return
    with TemporaryDirectory() as folder:
        path = _download_weights(str(weights), Path(folder))
        check_architecture(weights, path, model_cfg.name)
        yield cast(DictConfig, OmegaConf.merge(model_cfg, {"weights": str(path)}))  # a mapping merged: a DictConfig


def _download_weights(weights: str, folder: Path) -> Path:
    store = redact(mlflow.get_tracking_uri())
    if weights.startswith("models:/"):
        uri = weights
    else:
        run_id = weights.removeprefix("runs:/").strip("/").split("/")[0]
        try:
            saved = {a.path for a in MlflowClient().list_artifacts(run_id, "checkpoints")}
        except MlflowException:
            raise ConfigError(f"model.weights={weights}: no run {run_id} in {store}") from None
        for name in ("checkpoints/best.keras", "checkpoints/last.keras"):
            if name in saved:
                return Path(
                    mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(folder))
                )
        uri = f"runs:/{run_id}/model"
    try:
        model = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder))) / "data" / "model.keras"
    except (MlflowException, OSError) as exc:
        reason = first_line(exc)
        raise ConfigError(
            f"model.weights={weights}: no checkpoint or logged model there in {store} ({reason})"
        ) from None
    if not model.is_file():
        raise ConfigError(f"model.weights={weights}: not a Keras model logged by the workbench")
    return model


def log_config(cfg: DictConfig, hydra_dir: Path | None) -> None:
    """Params (the whole config as dotted keys) and the config files as artifacts, secrets redacted."""
    params = {k: v for k, v in flatten(cfg).items() if k not in RUN_CONTROL_KEYS}
    mlflow.log_params(params)  # MLflow batches these into few requests
    with TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(redacted_yaml(cfg))
        if hydra_dir is not None:
            for name in ("hydra.yaml", "overrides.yaml"):
                source = hydra_dir / name
                if source.is_file():
                    (Path(tmp) / name).write_text(_redact_file(source))
        mlflow.log_artifacts(tmp, artifact_path="config")


def _redact_file(path: Path) -> str:
    from omegaconf import OmegaConf

    return redacted_yaml(OmegaConf.load(path), resolve=False)


def run_tags(cfg: DictConfig, choices: dict[str, str], overrides: list[str], config_hash: str) -> dict[str, str]:
    """The run's tags: the user's `tracking.tags`, then what the workbench knows (which wins a clash)."""
    extra = cfg.tracking.get("tags")
    if extra is not None and not isinstance(extra, DictConfig):
        raise ConfigError(
            f"tracking.tags={extra}: must be a mapping of tag names to values; e.g. 'tracking.tags={{team: vision}}'"
        )
    return (
        flatten(extra or {})
        | {  # flatten hides secrets: URL passwords and secret-named keys' values
            "model": cfg.model.name,
            "optimizer": cfg.optimizer.name,
            "schedule": cfg.schedule.name,
            "augmentation": cfg.augmentation.name,
            "data": cfg.data.name,
            "recipe": choices.get("recipe") or "none",
            "overrides": redact(" ".join(overrides))[:5000],
            "workbench.config_hash": config_hash,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all"),
        }
        | _slurm_tags()
    )


def _slurm_tags() -> dict[str, str]:
    """Which SLURM job (array task) and node ran the run, when SLURM did: to find its logs with sacct/squeue."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return {}
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return {
        "slurm.job_id": f"{array}_{task}" if array and task else job,
        "slurm.node": os.environ.get("SLURMD_NODENAME", ""),
    }


def log_dataset(name: str, uri: str, digest: str, context: str = "training") -> None:
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if Path(uri).is_absolute():
        with warnings.catch_warnings():  # a local folder matches several source types; any one will do
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
    else:
        source = CodeDatasetSource({"loader": uri})
    # MetaDataset leaves Dataset's abstract `profile` undefined; Dataset has no ABCMeta, so it instantiates.
    dataset = MetaDataset(source=source, name=name, digest=digest)  # type: ignore[abstract]
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as exc:
        # The store checks for the dataset, then inserts it: parallel runs of one experiment can both
        # insert, and the loser hits the unique key (mlflow 3.17). Again, it finds the winner's row.
        if "unique constraint" not in str(exc).lower():
            raise
        mlflow.log_input(dataset, context=context)


def log_epoch_if_missing(box: Outbox, metrics: dict[str, float], epoch: int) -> None:
    """On resume: a stop that came after the epoch's checkpoint but before its metrics reached the store
    (or the outbox) leaves the epoch unlogged, and resume starts after it. Log it now, once."""
    key = next(iter(metrics), None)
    if key is not None and all(m.step != epoch for m in MlflowClient().get_metric_history(box.run_id, key)):
        box.metrics(metrics, epoch)


def log_curves(run_id: str) -> None:
    """A training-curve PNG from the run's whole metric history (earlier attempts of a resumed run too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = MlflowClient()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.5))
    for ax, keys in zip(axes, CURVES, strict=True):
        for key in keys:
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(keys[0].replace("_", " "))
        ax.legend()
    fig.tight_layout()
    client.log_figure(run_id, fig, "training_curves.png")
    plt.close(fig)


def ui_hint(run_id: str) -> str:
    """How to look at a run: the experiment's runs table on a server, or the `mlflow ui` command for a
    database store and then that table's address. The table, not the experiment: MLflow 3's UI opens an
    experiment on its GenAI overview of traces, where a training run does not show."""
    uri = mlflow.get_tracking_uri()
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    if uri.startswith(("http://", "https://")):
        return f"open {redact(uri.rstrip('/'))}/#/experiments/{experiment_id}/runs"
    return f"mlflow ui --backend-store-uri {redact(uri)}, then open http://127.0.0.1:5000/#/experiments/{experiment_id}/runs"


def log_class_names(class_names: list[str]) -> None:
    """`labels.txt`: one class name a line, in the order of the model's outputs."""
    mlflow.log_text("".join(f"{name}\n" for name in class_names), "labels.txt")


def log_model(model: keras.Model, size: int, class_names: list[str], architecture: str) -> None:
    """The final model as an MLflow Keras model (`mlflow.keras.load_model` loads it). Its metadata say
    how to feed it and read it: the class names in output order, the input size and the preprocessing."""
    from importlib.metadata import version

    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from workbench.models import preprocessing

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, size, size, 3), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(class_names)), "probabilities")]),
    )
    metadata = {
        "class_names": list(class_names),
        "input_size": size,
        "architecture": architecture,
        "preprocessing": preprocessing(architecture, size),
    }
    # The requirements are known: given, MLflow does not start its inference subprocess (tens of seconds).
    pip = [f"{name}=={version(name)}" for name in ("keras", "tensorflow")]
    mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=pip, metadata=metadata)
