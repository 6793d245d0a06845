"""Interrupt a run after epoch 2, resume it with trainer.resume=true, and end where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import ROOT, cli_env, run_cli, tracking_uri

# Full digits epochs at 24 px: slow enough to interrupt between epochs, quick enough for CI.
ARGS = ["trainer.epochs=4", "trainer.deterministic=true", "model.input_size=24", "tracking.log_model=false"]
COMPARED = ("loss", "accuracy", "val_loss", "val_accuracy", "val_top5_accuracy", "learning_rate")


def _interrupt_after_epoch(cwd: Path, epoch: int) -> int:
    """Start the run, SIGTERM it once the epoch checkpoint records `epoch` finished epochs."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *ARGS],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        states = list(cwd.glob("checkpoints/*/state.json"))
        if states and json.loads(states[0].read_text())["epoch"] >= epoch:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, f"the run ended before it could be interrupted:\n{out}"
    return json.loads(states[0].read_text())["epoch"]


def _only_run(cwd: Path):
    client = MlflowClient(tracking_uri(cwd))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def test_resume_continues_the_same_run_to_the_same_metrics_and_starts_fresh_without_one(tmp_path: Path) -> None:
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    interrupted.mkdir()
    straight.mkdir()

    saved = _interrupt_after_epoch(interrupted, epoch=2)
    assert 2 <= saved < 4
    client, killed = _only_run(interrupted)
    assert killed.info.status == "KILLED"
    # As if the stop had come between the epoch's checkpoint and its metrics' write (a kill -9 can):
    # resume must log the checkpointed epoch itself, since it starts after it.
    with contextlib.closing(sqlite3.connect(interrupted / "mlflow.db")) as db, db:
        db.execute("DELETE FROM metrics WHERE run_uuid = ? AND step = ?", (killed.info.run_id, saved))

    resumed = run_cli([*ARGS, "trainer.resume=true"], cwd=interrupted)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout + resumed.stderr
    client, run = _only_run(interrupted)  # the same MLflow run, now finished
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert sorted(steps) == [1, 2, 3, 4], "every epoch logged exactly once across both attempts"

    # The uninterrupted run asks to resume too: with no checkpoint yet, it starts from scratch.
    reference = run_cli([*ARGS, "trainer.resume=true"], cwd=straight)
    assert reference.returncode == 0, reference.stderr
    assert "No checkpoint in" in reference.stdout + reference.stderr
    _, expected = _only_run(straight)
    for key in COMPARED:
        assert run.data.metrics[key] == pytest.approx(expected.data.metrics[key], rel=1e-5, abs=1e-6), key
