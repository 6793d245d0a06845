"""Bad input is refused with one line on stderr and exit status 2, before TensorFlow or MLflow get involved."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_config, run_cli, tracking_uri
from PIL import Image

from workbench.config import ConfigError, validate

# One subprocess each. Without TensorFlow an answer takes about a second; 15 s is far above that and far
# below what importing TensorFlow and building a model would cost on a loaded 2-core machine.
FAST_S = 15.0

UNKNOWN_OPTIONS = [
    (["model=resnet5"], ["model=resnet5", "resnet50", "small_cnn"]),
    (["optimizer=sgd"], ["optimizer=sgd", "momentum", "rmsprop"]),
    (["schedule=step"], ["schedule=step", "exponential", "cosine"]),
    (["augmentation=randaugment"], ["augmentation=randaugment", "flip_crop", "none"]),
    (["data=imagenet"], ["data=imagenet", "digits", "image_folder"]),
    (["recipe=resnet101_imagenet"], ["recipe=resnet101_imagenet", "resnet50_imagenet"]),
    # A sweep value: the bad one is named, not the whole list.
    (["model=resnet50,nope"], ["model=nope", "resnet50", "inception_v3"]),
]

BAD_VALUES = [
    (["optimizer.learning_rate=0"], "optimizer.learning_rate", "> 0"),
    (["optimizer.learning_rate=-0.1"], "optimizer.learning_rate", "> 0"),
    (["trainer.batch_size=0"], "trainer.batch_size", "> 0"),
    (["trainer.epochs=0"], "trainer.epochs", "> 0"),
    (["trainer.epochs=-1"], "trainer.epochs", "> 0"),
    (["model.dropout=1.0"], "model.dropout", "[0, 1)"),
    (["model.dropout=-0.1"], "model.dropout", "[0, 1)"),
    (["schedule=exponential", "schedule.decay_factor=0"], "schedule.decay_factor", "(0, 1]"),
    (["schedule=exponential", "schedule.decay_factor=1.5"], "schedule.decay_factor", "(0, 1]"),
    (["model=nasnet_large", "model.input_size=31"], "model.input_size", "at least 32"),
    (["model=inception_v3", "model.input_size=74"], "model.input_size", "at least 75"),
    (["data=image_folder"], "data.path", "one sub-folder per class"),
]


def refuse(args: list[str], cwd: Path) -> tuple[str, subprocess.CompletedProcess]:
    """Run the CLI, check it refused the way a usage error should, and return the error line."""
    start = time.monotonic()
    result = run_cli(args, cwd=cwd, timeout=120)
    elapsed = time.monotonic() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), result.stderr
    assert elapsed < FAST_S, f"{elapsed:.1f} s to refuse {args}"
    assert_no_runs(cwd)
    return lines[0], result


def assert_no_runs(folder: Path) -> None:
    """No MLflow run was started (so none can be left RUNNING) in the store `python run.py` uses there."""
    if not (folder / "mlflow.db").exists():
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(folder))
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments) if experiments else []
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert runs == [], [(r.info.run_id, r.info.status) for r in runs]


@pytest.mark.parametrize(("args", "expected"), UNKNOWN_OPTIONS, ids=[" ".join(a) for a, _ in UNKNOWN_OPTIONS])
def test_unknown_group_option(workdir: Path, args: list[str], expected: list[str]) -> None:
    line, _ = refuse(args, workdir)
    for text in expected:  # the bad choice and some of the allowed ones
        assert text in line, line


@pytest.mark.parametrize(("args", "key", "allowed"), BAD_VALUES, ids=[" ".join(a) for a, _, _ in BAD_VALUES])
def test_bad_value(workdir: Path, args: list[str], key: str, allowed: str) -> None:
    line, _ = refuse(args, workdir)
    assert line.startswith(f"error: {key}"), line  # the key it names is the one that is wrong
    assert allowed in line, line


@pytest.mark.parametrize(("args", "key", "allowed"), BAD_VALUES, ids=[" ".join(a) for a, _, _ in BAD_VALUES])
def test_validate_refuses_bad_value(args: list[str], key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(args))
    message = str(info.value)
    assert message.startswith(key) and allowed in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "args",
    [
        ["schedule=exponential", "schedule.decay_factor=1.0", "model.dropout=0.0"],
        ["schedule=piecewise", "schedule.decay_factor=1.0"],
        ["model=inception_v3", "model.input_size=75"],
        ["model=nasnet_large", "model.input_size=32"],
        ["trainer.epochs=1", "trainer.batch_size=1"],
    ],
    ids=lambda args: " ".join(args),
)
def test_boundary_values_are_accepted(args: list[str]) -> None:
    validate(compose_config(args))


def test_bad_value_is_refused_before_tensorflow_is_imported(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Python's -X importtime, as an environment variable, lists every module the CLI imported on stderr.
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    result = run_cli(["optimizer.learning_rate=0"], cwd=workdir, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: optimizer.learning_rate=0" in result.stderr
    heavy = [line for line in result.stderr.splitlines() if re.search(r"\|\s+(tensorflow|keras)$", line)]
    assert heavy == [], "the CLI imported " + ", ".join(line.rsplit("|", 1)[1].strip() for line in heavy)


@pytest.mark.parametrize(
    "args", [[], ["--multirun", "trainer.epochs=1,2"], ["--multirun", "study=lr_batch_decay_dropout"]],
    ids=["run", "grid", "study"],
)
def test_a_tracking_server_that_does_not_answer_is_refused_at_once(workdir: Path, args: list[str]) -> None:
    # MLflow alone would retry for about four minutes and then print a traceback.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket closes
    line, _ = refuse([*args, f"tracking.uri={url}"], workdir)
    assert line.startswith(f"error: tracking.uri={url}: no MLflow server answers there"), line
    assert not (workdir / "optuna.db").exists(), "a refused study creates no study"


# --- image folders ----------------------------------------------------------------------------------------


def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(path.name)).integers(0, 256, size=(10, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def missing_folder(root: Path) -> Path:
    return root


def empty_folder(root: Path) -> Path:
    root.mkdir()
    return root


def class_with_text_only(root: Path) -> Path:
    write_png(root / "cat" / "1.png")
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("no pictures here\n")
    return root / "dog"


def class_with_garbage_jpeg(root: Path) -> Path:
    write_png(root / "cat" / "1.png")
    (root / "dog").mkdir()
    (root / "dog" / "x.jpg").write_bytes(b"this is not a JPEG" * 20)
    return root / "dog"


@pytest.mark.parametrize(
    ("make", "allowed"),
    [
        (missing_folder, "one sub-folder per class"),
        (empty_folder, "one sub-folder of images per class"),
        (class_with_text_only, "no readable image (JPEG, PNG"),
        (class_with_garbage_jpeg, "no readable image (JPEG, PNG"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_bad_image_folder(workdir: Path, make, allowed: str) -> None:
    root = workdir / "images"
    offending = make(root)
    line, _ = refuse(["data=image_folder", f"data.path={root}"], workdir)
    assert str(offending) in line, line
    assert allowed in line, line
