"""The local epoch checkpoint that resume and trial retries start from.

A folder holds `last.keras` (model and optimizer state after the last finished epoch), optionally
`best.keras`, and `state.json` (finished epochs, the MLflow run id, the best value so far). Every file is
written to a temporary name and renamed, so an interrupted write never leaves a corrupt checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import keras


@dataclass
class State:
    epoch: int = 0               # epochs finished
    run_id: str | None = None    # the MLflow run to continue
    best: float | None = None    # best monitored value so far
    rng: list[list[int]] | None = None  # seed-generator states (dropout masks), which .keras files omit


class CheckpointDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.last = self.path / "last.keras"
        self.best = self.path / "best.keras"
        self.state_file = self.path / "state.json"

    def exists(self) -> bool:
        return self.last.is_file() and self.state_file.is_file()

    def read_state(self) -> State:
        return State(**json.loads(self.state_file.read_text()))

    def write_state(self, state: State) -> None:
        _atomic(self.state_file, lambda tmp: tmp.write_text(json.dumps(asdict(state))))

    def save(self, model: keras.Model, target: Path) -> None:
        _atomic(target, lambda tmp: model.save(tmp))

    def copy_last(self, target: Path) -> None:
        """A copy of last.keras: cheaper than serialising the model a second time."""
        _atomic(target, lambda tmp: shutil.copyfile(self.last, tmp))

    def epoch_file(self, epoch: int) -> Path:
        return self.path / f"epoch-{epoch:04d}.keras"

    def clear(self) -> None:
        for f in self.path.glob("*.keras"):
            f.unlink()
        self.state_file.unlink(missing_ok=True)


def _atomic(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
    write(tmp)
    os.replace(tmp, target)


def _seed_states(model: keras.Model) -> list:
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def save_rng(model: keras.Model) -> list[list[int]]:
    return [keras.ops.convert_to_numpy(v).tolist() for v in _seed_states(model)]


def restore_rng(model: keras.Model, states: list[list[int]] | None) -> None:
    """Put dropout's random streams back where they were, so a resumed run draws the same masks."""
    for variable, value in zip(_seed_states(model), states or []):
        variable.assign(value)


def improved(monitor: str, value: float, best: float | None) -> bool:
    """Loss-like metrics improve downwards, everything else upwards."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if monitor.endswith("loss") else value > best


class Checkpointer(keras.callbacks.Callback):
    """Writes last (and best) after every epoch, then the state that points at them.

    Keras's ModelCheckpoint writes in place, so a kill mid-write corrupts the file; this writes atomically
    and records the MLflow run id and epoch that resume needs.
    """

    def __init__(self, directory: CheckpointDir, state: State, monitor: str, keep_best: bool, keep_every: bool):
        super().__init__()
        self.dir, self.state, self.monitor = directory, state, monitor
        self.keep_best, self.keep_every = keep_best, keep_every
        self.best_improved = False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        self.dir.save(self.model, self.dir.last)
        if self.keep_every:
            self.dir.copy_last(self.dir.epoch_file(epoch + 1))
        value = logs.get(self.monitor)
        self.best_improved = improved(self.monitor, value, self.state.best)
        if self.best_improved:
            self.state.best = float(value)
            if self.keep_best:
                self.dir.copy_last(self.dir.best)
        self.state.epoch = epoch + 1
        self.state.rng = save_rng(self.model)
        self.dir.write_state(self.state)
