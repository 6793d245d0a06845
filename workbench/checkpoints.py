"""The local epoch checkpoint that resume and trial retries start from.

A folder holds `last.keras` (model and optimizer state after the last finished epoch), optionally
`best.keras`, and `state.json` (finished epochs, the MLflow run id, the best value so far). Every file is
written to a temporary name and renamed, so an interrupted write never leaves a corrupt checkpoint. A run
holds the folder's lock while it trains: a second run of the same config is refused, not left to overwrite
the first one's files. No Keras import here: these checks come before TensorFlow loads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.config import ConfigError

if TYPE_CHECKING:
    import keras


@dataclass
class State:
    epoch: int = 0  # epochs finished
    run_id: str | None = None  # the MLflow run to continue
    best: float | None = None  # best monitored value so far
    rng: list[list[int]] | None = None  # seed-generator states (dropout masks), which .keras files omit
    metrics: dict[str, float] | None = None  # the last finished epoch's, in case a stop came before MLflow had them


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

    def resume_state(self) -> State:
        """The state to resume from; ConfigError when the checkpoint was damaged (from outside: every write
        here is atomic), saying how to start afresh."""
        try:
            state = self.read_state()
            with zipfile.ZipFile(self.last) as archive:
                damaged = archive.testzip()  # the first member whose data fails its checksum
        except (OSError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            damaged = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if damaged is not None:
            raise ConfigError(
                f"trainer.resume=true: the checkpoint in {self.path} is damaged ({damaged}); start afresh with "
                f"trainer.resume=false, or delete {self.path}"
            )
        return state

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the folder for one run; ConfigError at once when another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise ConfigError(
                    f"trainer.checkpoint_dir={self.path}: in use by process {holder} (a run of the same config); "
                    "wait for it, or give another trainer.checkpoint_dir"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock; the kernel does so too when the process dies

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


def _atomic(target: Path, write: Callable[[Path], object]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
    write(tmp)
    os.replace(tmp, target)


def _seed_states(model: keras.Model) -> list:
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def save_rng(model: keras.Model) -> list[list[int]]:
    import keras

    return [keras.ops.convert_to_numpy(v).tolist() for v in _seed_states(model)]


def restore_rng(model: keras.Model, states: list[list[int]] | None) -> None:
    """Put dropout's random streams back where they were, so a resumed run draws the same masks."""
    for variable, value in zip(_seed_states(model), states or [], strict=False):
        variable.assign(value)


def minimizes(monitor: str, mode: str) -> bool:
    """Whether a lower `monitor` is better: `mode` min or max, or auto as Keras's callbacks read it (loss
    metrics downwards, everything else upwards)."""
    return mode == "min" or (mode == "auto" and monitor.endswith("loss"))


def improved(value: float | None, best: float | None, minimize: bool) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if minimize else value > best
