"""A tracking server that goes away mid-run: training goes on, what the server could not take waits in the
run's outbox, and it all arrives (in order, once) when the server is back, or with `workbench sync`."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import ROOT, TrackingServer, cli_env, metric_steps, serve_mlflow, workbench_cli

# Full digits epochs at 24 px (about a second each): time to take the server away between epochs.
ARGS = ["model.input_size=24", "trainer.batch_size=64"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """One server for the module, each test with an experiment of its own: a test that stops it starts it again."""
    with serve_mlflow(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@contextlib.contextmanager
def _away(server: TrackingServer) -> Iterator[None]:
    server.stop()
    try:
        yield
    finally:
        server.start()


def _start(cwd: Path, server: TrackingServer, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), f"tracking.uri={server.url}", *ARGS, *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_epoch(cwd: Path, proc: subprocess.Popen, epoch: int) -> None:
    """Until the run's epoch checkpoint (local, whatever the server does) records `epoch` finished epochs."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = list(cwd.glob("checkpoints/*/state.json"))
        if states and json.loads(states[0].read_text())["epoch"] >= epoch:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"epoch {epoch} did not end in time")


def _unsent(cwd: Path) -> list[dict]:
    """The operations waiting in the run's outbox."""
    (ops,) = cwd.glob("checkpoints/outbox/*/ops.jsonl")
    sent_file = ops.with_name("sent")
    sent = int(sent_file.read_text()) if sent_file.is_file() else 0
    return [json.loads(line) for line in ops.read_text().splitlines()][sent:]


def _only_run(server: TrackingServer, experiment: str):
    client = MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def _complete(client: MlflowClient, run, epochs: int) -> None:
    assert run.info.status == "FINISHED", run.info.status
    for key in ("loss", "val_accuracy", "learning_rate"):
        assert metric_steps(client, run.info.run_id, key) == list(range(1, epochs + 1)), key
    files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert files == {"checkpoints/best.keras", "checkpoints/last.keras"}, files
    assert "training_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_the_server_away_mid_run_gets_every_epoch_when_it_is_back(workdir: Path, server: TrackingServer) -> None:
    proc = _start(workdir, server, "trainer.epochs=5", "tracking.log_model=false", "tracking.experiment=back")
    _wait_for_epoch(workdir, proc, 1)
    with _away(server):
        _wait_for_epoch(workdir, proc, 3)  # epochs 2 and 3 end while the server is away: kept on disk
        waiting = [op["step"] for op in _unsent(workdir) if op["op"] == "metrics"]
        assert {2, 3} <= set(waiting), waiting
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "workbench sync" not in output, output[-3000:]
    client, run = _only_run(server, "back")
    _complete(client, run, epochs=5)
    assert not list(workdir.glob("checkpoints/outbox/*")), "a sent outbox is removed"


def test_a_run_that_ends_while_the_server_is_away_exits_0_and_syncs_later(
    workdir: Path, server: TrackingServer
) -> None:
    proc = _start(workdir, server, "trainer.epochs=3", "tracking.server_wait_s=1", "tracking.experiment=away")
    _wait_for_epoch(workdir, proc, 1)
    with _away(server):
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
        (box,) = workdir.glob("checkpoints/outbox/*")
        warned = [line for line in output.splitlines() if "workbench sync" in line]
        assert len(warned) == 1 and f"workbench sync {box.relative_to(workdir)}" in warned[0], output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        assert _unsent(workdir)[-1] == {"op": "status", "status": "FINISHED"}
        away = workbench_cli(["sync"], workdir)
        assert away.returncode == 1 and "still wait" in away.stdout, away.stdout + away.stderr
    assert _only_run(server, "away")[1].info.status == "RUNNING"  # its end is sent last, after the rest
    synced = workbench_cli(["sync"], workdir)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert f"Sent run {box.name}" in synced.stdout, synced.stdout
    assert not box.exists()
    client, run = _only_run(server, "away")
    _complete(client, run, epochs=3)
    logged = client.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in logged] == [run.info.run_id]  # the model, from the kept checkpoint

    again = workbench_cli(["sync"], workdir)
    assert again.returncode == 0 and "Nothing to send" in again.stdout, again.stdout + again.stderr
