"""The cluster path on real services: PostgreSQL study storage, an `mlflow server` with a PostgreSQL backend,
and study workers as jobs of Hydra's submitit launcher through its local executor (hydra/launcher=local_gpu);
tests/test_slurm.py runs studies on a real SLURM.

In CI these never skip: PostgreSQL must be reachable (conftest fails the test otherwise).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import (
    ROOT,
    SMALL_TRIALS,
    TINY,
    TrackingServer,
    check_study,
    cli_env,
    cluster_study,
    postgres_admin,
    postgres_study,
    serve_mlflow,
    with_password,
)


def _study_args(postgres_url: str, server: str, *extra: str, workers: int) -> list[str]:
    return cluster_study(with_password(postgres_url), server, *extra, workers=workers, launcher="local_gpu")


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_connections_the_storage_server_drops_mid_study_are_made_again(
    workdir: Path, postgres_url: str, mlflow_server: TrackingServer
) -> None:
    """The study database's idle connections terminated every second (as a restart or a failover does):
    workers reconnect, and no trial is lost or run twice."""
    args = _study_args(postgres_url, mlflow_server.url, "study.n_trials=4", "trainer.epochs=3", workers=2)
    study_proc = _start(args, workdir)
    database, terminated, output = postgres_url.rsplit("/", 1)[1], 0, None
    with postgres_admin() as admin:
        while output is None:
            row = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND state = 'idle'",
                (database,),
            ).fetchone()
            terminated += row[0] if row else 0
            try:
                output, _ = study_proc.communicate(timeout=1)  # keeps reading the output: no full pipe
            except subprocess.TimeoutExpired:
                continue
    assert study_proc.returncode == 0, output[-4000:]
    assert terminated >= 5, terminated
    check_study(postgres_study(postgres_url), mlflow_server.url, n_trials=4)


def test_every_storage_call_that_opens_a_database_session_waits_out_a_dropped_connection() -> None:
    # The behaviour is tested above; this keeps the list whole. A call left out (Optuna's cache reads trials
    # through the private _get_trials) failed a worker in CI when its connection was dropped mid-call.
    import inspect

    from optuna.storages import RDBStorage

    from workbench.study.storage import RETRIED_CALLS

    opens_session = {
        name
        for name, method in inspect.getmembers(RDBStorage, inspect.isfunction)
        if "_create_scoped_session(" in inspect.getsource(method)
    }
    assert opens_session - {"delete_study"} == set(RETRIED_CALLS)  # the workbench deletes no study


RACE = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from workbench import tracking
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together: the race is the point
overrides = {"uri": sys.argv[1], "experiment": "fresh", "server_wait_s": 0, "system_metrics": False}
cfg = OmegaConf.merge(OmegaConf.load(sys.argv[3]), overrides)
with tracking.run(cfg, tracking.configure(cfg), Path("checkpoints")):
    tracking.log_dataset("digits", "sklearn.datasets.load_digits", "9b4db4a52cd4")
"""


def test_parallel_jobs_that_create_the_experiment_all_log_into_it(mlflow_server: TrackingServer) -> None:
    # MLflow leaves the loser of an experiment creation race on the Default experiment, where its run
    # would go missing, and fails the loser of a dataset creation race on the unique key.
    start = time.time() + 8
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, mlflow_server.url, str(start), str(ROOT / "conf/tracking/default.yaml")],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(6)
    ]
    for job in jobs:
        output, _ = job.communicate(timeout=120)
        assert job.returncode == 0, output
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("fresh").experiment_id])
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert all([d.dataset.name for d in r.inputs.dataset_inputs] == ["digits"] for r in runs)


def test_a_grid_multirun_through_the_same_launcher(workdir: Path, mlflow_server: TrackingServer) -> None:
    result = _start(
        [
            "--multirun",
            "hydra/launcher=local_gpu",
            "hydra.launcher.gpus_per_node=2",
            "optimizer=adam,momentum",
            f"tracking.uri={mlflow_server.url}",
            "tracking.experiment=grid",
            "trainer.epochs=1",
            *SMALL_TRIALS,
        ],
        workdir,
    )
    output, _ = result.communicate(timeout=900)
    assert result.returncode == 0, output[-4000:]
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.params["optimizer.name"] for r in runs} == {"adam", "momentum"}
    # Two GPUs on the machine, one per job, by job number.
    assert sorted(r.data.tags["cuda_visible_devices"] for r in runs) == ["0", "1"]


MLFLOW_PASSWORD = "mlflow-s3cret-pass"


def test_credentials_for_an_auth_enabled_server_come_from_the_environment(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path_factory.mktemp("auth-server")
    (folder / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{folder / 'auth.db'}\n"
        "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    auth = {
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-the-test",
    }
    with serve_mlflow(folder, "--app-name", "basic-auth", env=auth) as server:
        args = [
            sys.executable,
            str(ROOT / "run.py"),
            f"tracking.uri={server.url}",
            *TINY,
            "trainer.epochs=1",
            "tracking.log_model=false",
        ]
        refused = subprocess.run(args, cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=300)
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
        assert lines[0].startswith(f"error: tracking.uri={server.url}: the server refused access"), lines
        assert "MLFLOW_TRACKING_USERNAME" in lines[0]

        credentials = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}
        result = subprocess.run(
            args, cwd=workdir, env={**cli_env(), **credentials}, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        for name, value in credentials.items():
            monkeypatch.setenv(name, value)
        client = MlflowClient(server.url)
        (run,) = client.search_runs([client.get_experiment_by_name("workbench").experiment_id])
        assert run.info.status == "FINISHED"
        assert MLFLOW_PASSWORD not in result.stdout + result.stderr + str(run.data.params) + str(run.data.tags)
        for path in [*workdir.rglob("*"), *server.artifacts.rglob("*")]:
            if path.is_file():
                assert MLFLOW_PASSWORD.encode() not in path.read_bytes(), path
