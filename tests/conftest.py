"""Shared fixtures: a scratch working directory per test, a throwaway PostgreSQL database, a tracking server.
Plain helpers that tests import live in helpers.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from helpers import TrackingServer, serve_mlflow, throwaway_database

# One thread per TensorFlow op, in this process and the CLI processes tests start: two test processes run
# at once on two cores, and TensorFlow's own pool of a thread per core made each training run spend 18 %
# more CPU time (measured on small_cnn) for no speed-up. Only the tests' environment: the workbench keeps
# TensorFlow's defaults.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The workbench's user cache (image-folder scans, the empty MLflow store it copies) in a folder of the
    test session, shared by its tests and the CLI they start, never the user's own ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def mlflow_default_store() -> Iterator[None]:
    """Every test starts on MLflow's default store: `mlflow.set_tracking_uri`, which the workbench's commands
    and some tests call in-process, is process-wide, and it carried one test's store into the next test the
    same xdist worker ran (a run "not found" in the store the next test looked in)."""
    mlflow.set_tracking_uri(None)  # None is MLflow's own reset: back to the default
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder, so mlflow.db, checkpoints/ and outputs/ land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway database for Optuna, dropped afterwards."""
    with throwaway_database() as url:
        yield url


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """One tracking server per test module: tests tell their runs apart by run id or experiment name."""
    with serve_mlflow(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


# Longest first: pytest-xdist hands out one file at a time in this order (--dist loadfile), so the long
# files start at once and short ones fill the gaps, instead of a long file starting last.
SLOW_FIRST = (
    "test_cluster",
    "test_mission",
    "test_study_resume",
    "test_study",
    "test_study_failures",
    "test_own_images",
    "test_slurm",
    "test_finetune",
    "test_registry",
    "test_keep",
    "test_outage",
    "test_models_chooser",
    "test_cv",
    "test_trainer",
    "test_lr_find",
    "test_run",
    "test_resume",
    "test_stops",
    "test_context",
    "test_eval",
    "test_records",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.stem
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a file
