"""What tests share besides fixtures: config composition, the CLI as a subprocess, broken image files,
PostgreSQL and a real `mlflow server`. Fixtures that use these live in conftest.py."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import psycopg
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from optuna.trial import TrialState
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Small and quick: the overrides most tests start from.
TINY = ["trainer.epochs=2", "trainer.steps_per_epoch=2", "trainer.batch_size=16", "model.input_size=16"]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `python run.py <overrides>` would train, composed with Hydra's compose API."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides or [])


def run_cli(
    args: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None, **popen
) -> subprocess.CompletedProcess:
    """`python run.py <args>` in `cwd`, as a user would type it (in `env`, else the tests' usual one)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def tracking_uri(folder: Path) -> str:
    """The store `python run.py` uses by default when started in `folder`."""
    return f"sqlite:///{folder / 'mlflow.db'}"


# --- image files: whole, truncated and corrupt JPEGs -----------------------------------------------------


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def truncated_jpeg(seed: int) -> bytes:
    """A JPEG cut short: its signature is right, decoding runs out of data."""
    data = jpeg_bytes(seed)
    return data[: len(data) // 3]


def corrupt_jpeg(seed: int) -> bytes:
    """A whole JPEG whose compressed body is overwritten in the middle: libjpeg stops with an error."""
    data = bytearray(jpeg_bytes(seed))
    middle = len(data) // 2
    data[middle : middle + 200] = b"\xff" * 200
    return bytes(data)


# (name, Pillow format, mode): upper-case suffixes, spaces, accents, grayscale and RGBA PNGs, a nested file.
ODD_FILES = (
    ("photo {i}.JPG", "JPEG", "RGB"),
    ("été {i}.jpeg", "JPEG", "RGB"),
    ("grey {i}.PNG", "PNG", "L"),
    ("alpha {i}.png", "PNG", "RGBA"),
    ("nested/ünï {i}.jpg", "JPEG", "L"),
    ("IMG_{i}.Jpg", "JPEG", "RGB"),
)


def image_bytes(seed: int, fmt: str, mode: str) -> bytes:
    """An image of random pixels and random size (12-39 px a side) in the given Pillow format and mode."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(12, 40, size=2)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def odd_image_folder(root: Path, classes: tuple[str, ...], per_class: int, corrupt: str) -> Path:
    """An image folder as users have them: the file names of ODD_FILES in turn, and one corrupt JPEG."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            pattern, fmt, mode = ODD_FILES[i % len(ODD_FILES)]
            path = root / name / pattern.format(i=i)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(100 * c + i, fmt, mode))
    (root / corrupt).write_bytes(corrupt_jpeg(7))
    return root


# --- PostgreSQL and an MLflow tracking server, for the cluster tests -------------------------------------

POSTGRES = os.environ.get("WORKBENCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_admin():
    """A connection to the PostgreSQL server the cluster tests use; in CI it must be there."""
    import psycopg

    try:
        return psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is unreachable at {POSTGRES} and CI needs it: {exc}")
        pytest.skip(
            f"PostgreSQL is unreachable at {POSTGRES}; start one with trust authentication on 127.0.0.1:5432 "
            "(or point WORKBENCH_TEST_POSTGRES at a server whose user may create databases) to run these tests"
        )


@contextlib.contextmanager
def throwaway_database() -> Iterator[str]:
    name = f"wb_test_{uuid.uuid4().hex[:10]}"
    with postgres_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES.rsplit('/', 1)[0]}/{name}"
    finally:
        with postgres_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class TrackingServer:
    """A real `mlflow server` with a PostgreSQL backend and a shared artifact folder, on a free loopback port.
    `stop()` and `start()` take it away and bring it back on the same port and store, as a restart would."""

    def __init__(self, folder: Path, database: str, *args: str, env: dict[str, str] | None = None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.artifacts, self.folder = f"http://127.0.0.1:{port}", folder / "artifacts", folder
        self._command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            database.replace("postgresql://", "postgresql+psycopg://", 1),
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            *args,
        ]
        # Its job runner (seven huey processes) serves MLflow's GenAI jobs, which the workbench never uses.
        self._env = {**cli_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        import time
        import urllib.request

        with (self.folder / "server.log").open("a") as log:
            self._process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT, env=self._env)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    log_text = (self.folder / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"mlflow server did not start: {log_text}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)
            self._process = None


@contextlib.contextmanager
def serve_mlflow(folder: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[TrackingServer]:
    # Its own database: MLflow and Optuna both keep an alembic_version table.
    with throwaway_database() as database:
        server = TrackingServer(folder, database, *args, env=env)
        server.start()
        try:
            yield server
        finally:
            server.stop()


# --- studies: `python run.py --multirun study=...` on a SQLite storage in the test's folder ---------------

STUDY = "lr_batch_decay_dropout"
# Seconds per trial on a CPU: 16-pixel digits, 2 steps per epoch, 2 validation batches.
SMALL = [
    "trainer.steps_per_epoch=2",
    "trainer.batch_size=16",
    "model.input_size=16",
    "trainer.validation_steps=2",
    "tracking.log_model=false",
    "tracking.checkpoints=none",
]


def multirun(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_cli(["--multirun", *args], cwd=cwd, timeout=timeout)


def workbench_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The `workbench` console command."""
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def load_study(cwd: Path, name: str = STUDY) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'optuna.db'}")


def trials_so_far(cwd: Path, name: str = STUDY) -> list[optuna.trial.FrozenTrial]:
    """The trials of a study in progress; none before the launching process has created it. Opening the
    storage before then would create the schema too, racing the launcher (one CREATE TABLE fails)."""
    database = cwd / "optuna.db"
    if not database.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(database)) as connection:
            found = connection.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone()
        return load_study(cwd, name).get_trials(deepcopy=False) if found else []
    except (sqlite3.OperationalError, optuna.exceptions.StorageInternalError):  # no table yet, or locked
        return []


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --- studies on PostgreSQL ---------------------------------------------------------------------------


SECRET = "pg-s3cret-pass"


def with_password(url: str) -> str:
    # Trust authentication ignores the password, which lets the test check that it never leaks.
    return url.replace("postgres@", f"postgres:{SECRET}@", 1)


def no_secret(cwd: Path, server_artifacts: Path, output: str, client: MlflowClient) -> None:
    """SECRET appears nowhere: not in the console output, the logs, the server's artifacts, params or tags."""
    assert SECRET not in output
    for path in [*cwd.rglob("*.log"), *server_artifacts.rglob("*")]:
        if path.is_file() and path.suffix in (".log", ".yaml", ".txt", ".json", ".html"):
            assert SECRET not in path.read_text(errors="ignore"), path
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            assert SECRET not in str(run.data.params) + str(run.data.tags)


# Trials small enough for several workers on two cores, deterministic so a resumed trial can be compared.
SMALL_TRIALS = [
    "trainer.steps_per_epoch=3",
    "trainer.batch_size=16",
    "model.input_size=16",
    "trainer.validation_steps=2",
    "tracking.log_model=false",
    "tracking.checkpoints=none",
    "trainer.deterministic=true",
]


def cluster_study(storage: str, server: str, *extra: str, workers: int, launcher: str) -> list[str]:
    """`run.py` arguments of a study of SMALL_TRIALS on a storage and a tracking server, through `launcher`."""
    # A dead worker is found within seconds; the grace period leaves room for a loaded machine, where a
    # live worker's heartbeat can come late while TensorFlow starts in several processes at once.
    return [
        "--multirun",
        f"study={STUDY}",
        f"hydra/launcher={launcher}",
        f"study.workers={workers}",
        f"study.storage={storage}",
        f"tracking.uri={server}",
        "study.pruner.name=none",
        "study.heartbeat_interval=1",
        "study.grace_period=10",
        *SMALL_TRIALS,
        *extra,
    ]


@functools.cache
def _postgres_storage(postgres_url: str, name: str) -> optuna.storages.RDBStorage:
    # One engine per database, as a worker keeps: a storage per poll holds a connection each until
    # PostgreSQL refuses more clients. Opening one stamps the schema version where there is none yet,
    # which would race the launching process creating the schema: wait until its study exists.
    with psycopg.connect(postgres_url) as connection:
        try:
            found = connection.execute("SELECT 1 FROM studies WHERE study_name = %s", (name,)).fetchone()
        except psycopg.errors.UndefinedTable:
            found = None
    if found is None:
        raise KeyError(f"no study {name} yet")
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    return optuna.storages.RDBStorage(url, skip_table_creation=True)


def postgres_study(postgres_url: str, name: str = STUDY) -> optuna.Study:
    """A study in a PostgreSQL database (KeyError until the launching process has created it)."""
    return optuna.load_study(study_name=name, storage=_postgres_storage(postgres_url, name))


def check_study(study: optuna.Study, server: str, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly n_trials complete, distinct numbers, none left running, each a FINISHED child run of the parent."""
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == n_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({t.number for t in trials}) == len(trials)
    client = MlflowClient(server)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    for trial in done:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.info.status == "FINISHED"
    return trials


def wait_for_a_trial_after_epoch(
    study_url: str, study_proc: subprocess.Popen, epoch: int, timeout: float = 600
) -> optuna.trial.FrozenTrial:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if study_proc.poll() is not None:  # say why at once rather than wait out the timeout
            raise AssertionError(f"the study ended first:\n{study_proc.stdout.read()[-4000:]}")
        try:
            for trial in postgres_study(study_url).get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                # Not a retry: a retry inherits the epochs and, until it starts, the dead worker's pid.
                original = "failed_trial" not in trial.system_attrs
                if original and len(trial.intermediate_values) >= epoch and "worker" in trial.user_attrs:
                    return trial
        except KeyError:  # no study yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"no trial reached epoch {epoch}")


def wait_until_done(study_url: str, n_trials: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trials = postgres_study(study_url).get_trials(deepcopy=False)
        if sum(t.state == TrialState.COMPLETE for t in trials) >= n_trials and not any(
            t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials
        ):
            return
        time.sleep(1)
    raise AssertionError("the remaining workers did not finish the study")
