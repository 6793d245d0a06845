"""The outbox on a real SQLite store: sending again what already arrived adds nothing, and a run that
starts again supersedes the status an earlier attempt left unsent."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from workbench.outbox import Outbox


def _run(folder: Path) -> tuple[MlflowClient, str, str]:
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("outbox"))
    return client, run.info.run_id, uri


def test_what_is_sent_twice_arrives_once(tmp_path: Path) -> None:
    client, run_id, uri = _run(tmp_path)
    box = Outbox.open(tmp_path / "checkpoints", run_id, uri)
    for epoch in (1, 2):
        box.metrics({"loss": 1.0 / epoch, "val_accuracy": 0.5 * epoch}, epoch)
    (tmp_path / "last.keras").write_bytes(b"weights")
    box.artifact(tmp_path / "last.keras", "checkpoints")
    # The next epoch's checkpoint replaces the file, as checkpoints are written: a new file renamed over it.
    (tmp_path / "next.keras").write_bytes(b"a later epoch")
    (tmp_path / "next.keras").replace(tmp_path / "last.keras")
    assert box.send() and box.pending() == 0
    box.sent_file.write_text("0")  # as if a kill had come before the outbox recorded what it sent
    assert box.send()
    for key in ("loss", "val_accuracy"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2], key
    local = client.download_artifacts(run_id, "checkpoints/last.keras", str(tmp_path))
    assert Path(local).read_bytes() == b"weights"


def test_a_run_started_again_is_running_until_its_new_end(tmp_path: Path) -> None:
    client, run_id, uri = _run(tmp_path)
    first = Outbox.open(tmp_path / "checkpoints", run_id, uri)
    first.metrics({"loss": 1.0}, 1)
    first.status("KILLED")
    first.unlock()  # the first attempt's process is gone, its last items unsent

    again = Outbox.open(tmp_path / "checkpoints", run_id, uri)  # resume: the same run
    assert again.pending() == 4  # the first start, its epoch, its end, and this start
    assert again.send()
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and [m.step for m in client.get_metric_history(run_id, "loss")] == [1]
    again.status("FINISHED")
    assert again.send() and client.get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / "checkpoints" / "outbox").exists(), "a sent outbox of an ended run is removed"
