"""The epoch checkpoint folder: one run at a time, and a damaged checkpoint refused before anything starts."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from helpers import TINY, run_cli
from workbench.checkpoints import CheckpointDir


def _refused(args: list[str], cwd: Path) -> str:
    result = run_cli(args, cwd=cwd, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert not (cwd / "mlflow.db").exists() and not (cwd / "outputs").exists(), "a refused run writes nothing"
    return lines[0]


def test_a_second_run_of_the_same_config_is_refused_while_the_first_holds_the_folder(workdir: Path) -> None:
    folder = workdir / "ckpt"
    with CheckpointDir(folder).in_use():  # this process plays the first run
        line = _refused([*TINY, f"trainer.checkpoint_dir={folder}"], workdir)
    assert line == (
        f"error: trainer.checkpoint_dir={folder}: in use by process {os.getpid()} (a run of the same config); "
        "wait for it, or give another trainer.checkpoint_dir"
    )
    with CheckpointDir(folder).in_use():  # released: free again
        pass


def test_resuming_from_a_damaged_checkpoint_is_refused_with_how_to_start_afresh(workdir: Path) -> None:
    folder = workdir / "ckpt"
    folder.mkdir()
    with zipfile.ZipFile(folder / "last.keras", "w") as archive:
        archive.writestr("config.json", "{}" * 1000)
        archive.writestr("model.weights.h5", os.urandom(4096))
    data = (folder / "last.keras").read_bytes()
    (folder / "last.keras").write_bytes(data[: len(data) // 2])  # cut short, as a full disk or a bad copy would
    (folder / "state.json").write_text(json.dumps({"epoch": 1, "run_id": None, "best": None, "rng": None}))
    line = _refused([*TINY, f"trainer.checkpoint_dir={folder}", "trainer.resume=true"], workdir)
    assert line.startswith(f"error: trainer.resume=true: the checkpoint in {folder} is damaged"), line
    assert line.endswith(f"start afresh with trainer.resume=false, or delete {folder}"), line
