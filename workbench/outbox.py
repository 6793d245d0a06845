"""What a run sends to MLflow once it has started, kept on local disk until the tracking store has it.

A tracking server that goes away mid-run then loses nothing. Each epoch's metrics, the end-of-run uploads
and the run's final status are written to the run's outbox first, beside its epoch checkpoint
(`<checkpoints>/outbox/<run id>/`), and sent from there in order: at once, or when the store answers
again (at the next epoch; at the end of the run, for up to `tracking.server_wait_s`; or with `workbench
sync`). Sending twice is harmless: a metric keeps its timestamp, and MLflow's stores skip a metric they
already hold (same key, step, timestamp and value); an artifact is overwritten; a status is set again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.config import ConfigError, redact

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

FOLDER = "outbox"  # under the checkpoint folder's parent: checkpoints/outbox/<run id>/
TERMINAL = ("FINISHED", "FAILED", "KILLED")


class Outbox:
    """One run's queue of what the tracking store has yet to receive; `send` empties it in order."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ops_file = folder / "ops.jsonl"
        self.sent_file = folder / "sent"
        self._live: dict[int, keras.Model] = {}  # a model to log, in the process that trained it
        self._lock_fd: int | None = None
        self._size: int | None = None  # operations in ops.jsonl, once read: only the owner appends
        self._mutex = threading.RLock()  # the owner's threads: training and system metrics (system_metrics.py)

    @classmethod
    def open(cls, root: Path, run_id: str, tracking_uri: str, starting: bool = True) -> Outbox:
        """The outbox of a run that starts (or starts again, keeping what an earlier attempt left unsent);
        with `starting=False`, of a run another process left behind, to end it."""
        box = cls(root / FOLDER / run_id)
        box.folder.mkdir(parents=True, exist_ok=True)
        box.lock()
        run_file = box.folder / "run.json"
        if not run_file.is_file():
            # With a password in it, the store's URI is not written down: `workbench sync` then needs it given.
            uri = _absolute(tracking_uri)
            _atomic_write(run_file, json.dumps({"run_id": run_id, "tracking_uri": uri if redact(uri) == uri else None}))
        if starting:
            box._add({"op": "status", "status": "RUNNING"})  # an earlier attempt's final status no longer holds
        return box

    @property
    def run_id(self) -> str:
        return self.folder.name

    @property
    def tracking_uri(self) -> str | None:
        return json.loads((self.folder / "run.json").read_text())["tracking_uri"]

    def lock(self) -> None:
        """Held while a process owns the outbox: `workbench sync` leaves a live run's outbox alone."""
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{self.folder}: in use by a running process; let it finish first") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # What a run puts in, in the order it is to reach the store.

    def metrics(self, values: dict[str, float], step: int) -> None:
        self._add({"op": "metrics", "step": step, "timestamp": int(time.time() * 1000), "values": values})

    def artifact(self, file: Path, artifact_path: str) -> None:
        """A file to upload as it is now: linked into the outbox, so a later write to `file` changes nothing."""
        self._add({"op": "artifact", "file": self._keep(file), "path": artifact_path})

    def curves(self) -> None:
        """The training-curve PNG, drawn from the store's history once everything before it has been sent."""
        self._add({"op": "curves"})

    def model(
        self, model: keras.Model, saved: Path, input_size: int, class_names: list[str], architecture: str
    ) -> None:
        """The final model, logged from memory by this process, or loaded from `saved` (the same weights,
        e.g. the last epoch checkpoint) by `workbench sync`."""
        meta = {"input_size": input_size, "class_names": class_names, "architecture": architecture}
        self._live[self._add({"op": "model", "file": self._keep(saved), **meta})] = model

    def tag(self, key: str, value: str) -> None:
        self._add({"op": "tag", "key": key, "value": value})

    def status(self, status: str) -> None:
        self._add({"op": "status", "status": status})

    # Sending.

    def pending(self) -> int:
        return self._count() - self._sent()

    def send(self, patience_s: float = 0.0) -> bool:
        """Send what is pending, in order; True once nothing is. While the store does not answer, try again
        for up to `patience_s` seconds. An outbox whose run has ended is removed once it is sent."""
        with self._mutex:
            return self._send(patience_s)

    def _send(self, patience_s: float) -> bool:
        deadline, pause = time.monotonic() + patience_s, 1.0
        while True:
            try:
                ops = self._send_pending()
                break
            except Unreachable:
                if time.monotonic() + pause > deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 30.0)
        if ops and ops[-1]["op"] == "status" and ops[-1]["status"] in TERMINAL:
            self.unlock()
            shutil.rmtree(self.folder, ignore_errors=True)
            self._size = None  # nothing left to count
            with contextlib.suppress(OSError):
                self.folder.parent.rmdir()  # the last one out: no empty outbox/ left among the checkpoints
        return True

    def _send_pending(self) -> list[dict[str, Any]]:
        """Send from the first unsent operation on; return them all."""
        from mlflow.tracking import MlflowClient

        ops, sent = self._ops(), self._sent()
        client = MlflowClient()
        with no_retries():
            for index in range(sent, len(ops)):
                try:
                    self._send_one(client, index, ops[index])
                except Exception as exc:
                    if _unreachable(exc):
                        raise Unreachable(str(exc)) from exc
                    raise
                _atomic_write(self.sent_file, str(index + 1))  # its files stay until the run's end is sent
        return ops

    def _send_one(self, client: Any, index: int, op: dict[str, Any]) -> None:
        import mlflow
        from mlflow.entities import Metric

        from workbench import tracking

        run_id, kind = self.run_id, op["op"]
        if kind == "metrics":
            metrics = [Metric(k, float(v), op["timestamp"], op["step"]) for k, v in op["values"].items()]
            client.log_batch(run_id, metrics=metrics)
        elif kind == "artifact":
            client.log_artifact(run_id, str(self.folder / op["file"]), op["path"])
        elif kind == "curves":
            tracking.log_curves(run_id)
        elif kind == "model":
            model = self._live.get(index)
            if model is None:
                import keras

                model = keras.saving.load_model(self.folder / op["file"])
            active = mlflow.active_run()
            if active is None or active.info.run_id != run_id:
                mlflow.start_run(run_id=run_id)  # MLflow logs a model to the active run only; the status ends it
            tracking.log_model(model, op["input_size"], op["class_names"], op["architecture"])
        elif kind == "tag":
            client.set_tag(run_id, op["key"], op["value"])
        elif op["status"] == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run(op["status"])  # leaves the active run first: sent again, it is set by the client
            else:
                client.set_terminated(run_id, op["status"])

    def _add(self, op: dict[str, Any]) -> int:
        """Append one operation (one JSON line, flushed to disk); return its index."""
        with self._mutex:
            index = self._count()
            with self.ops_file.open("a") as f:
                f.write(json.dumps(op) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._size = index + 1
            return index

    def _count(self) -> int:
        if self._size is None:
            self._size = len(self._ops())
        return self._size

    def _ops(self) -> list[dict[str, Any]]:
        if not self.ops_file.is_file():
            return []
        ops = []
        for line in self.ops_file.read_text().splitlines():
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: nothing after it was written
                break
        return ops

    def _sent(self) -> int:
        return int(self.sent_file.read_text()) if self.sent_file.is_file() else 0

    def _keep(self, file: Path) -> str:
        """A hard link to `file` inside the outbox (a copy where links fail): the same bytes, kept until sent."""
        target = self.folder / "files" / str(self._count()) / file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copyfile(file, target)
        return str(target.relative_to(self.folder))


def end_abandoned(root: Path, run_id: str, tracking_uri: str, tags: dict[str, str]) -> bool:
    """End KILLED, with `tags`, a run whose process died without ending it, through its outbox under `root`
    (after whatever the dead process left unsent there). False when a live process holds the outbox: the
    run is not abandoned after all, and its process ends it."""
    try:
        box = Outbox.open(root, run_id, tracking_uri, starting=False)
    except ConfigError:
        return False
    for key, value in tags.items():
        box.tag(key, value)
    box.status("KILLED")
    box.send()
    box.unlock()
    return True


class Unreachable(Exception):
    """The tracking store did not answer (or answered that it cannot serve now): try again later."""


def find(paths: list[Path]) -> list[Outbox]:
    """The outboxes at or under `paths` (an outbox folder, or any folder holding some)."""
    found: dict[Path, Outbox] = {}
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path}: no such folder; give an outbox folder or one holding them (checkpoints)")
        for ops in sorted([path / "ops.jsonl"] if (path / "ops.jsonl").is_file() else path.rglob("ops.jsonl")):
            found.setdefault(ops.parent.resolve(), Outbox(ops.parent))
    return list(found.values())


def _unreachable(exc: Exception) -> bool:
    """A store that is away, restarting or overloaded (no answer, a 5xx, 429), not a request it refuses."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(exc, (ConnectionError, TimeoutError, requests.RequestException))


@contextlib.contextmanager
def no_retries() -> Iterator[None]:
    """MLflow's HTTP client retries a request for about four minutes (7 retries with backoff, mlflow 3.17);
    an epoch must not wait that long for a server that is away. The outbox retries instead, later. MLflow
    reads the setting at each request, from the environment only."""
    name = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    previous = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _absolute(uri: str) -> str:
    """A relative SQLite path is relative to where the run started; `workbench sync` may run elsewhere."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
