"""What tests share besides fixtures: config composition, the CLI as a subprocess, PostgreSQL and a real
`mlflow server`. Fixtures that use these live in conftest.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Small and quick: the overrides most tests start from.
TINY = ["trainer.epochs=2", "trainer.steps_per_epoch=2", "trainer.batch_size=16", "model.input_size=16"]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `python run.py <overrides>` would train, composed with Hydra's compose API."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides or [])


def run_cli(args: list[str], cwd: Path, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """`python run.py <args>` in `cwd`, as a user would type it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout, **popen,
    )


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def tracking_uri(folder: Path) -> str:
    """The store `python run.py` uses by default when started in `folder`."""
    return f"sqlite:///{folder / 'mlflow.db'}"


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


class TrackingServer(NamedTuple):
    url: str
    artifacts: Path  # the shared folder behind --artifacts-destination


@contextlib.contextmanager
def serve_mlflow(folder: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[TrackingServer]:
    """A real `mlflow server` with a PostgreSQL backend and a shared artifact folder, on a free loopback port."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Its own database: MLflow and Optuna both keep an alembic_version table.
    with throwaway_database() as database, (folder / "server.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", database.replace("postgresql://", "postgresql+psycopg://", 1),
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", *args],
            stdout=log, stderr=subprocess.STDOUT,
            # Its job runner (seven huey processes) serves MLflow's GenAI jobs, which the workbench never uses.
            env={**cli_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})},
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        try:
            yield TrackingServer(url, folder / "artifacts")
        finally:
            server.terminate()
            server.wait(timeout=30)
