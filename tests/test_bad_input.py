"""Bad input is refused with one line on stderr and exit status 2, before TensorFlow or MLflow get involved."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import compose_config, run_cli, tracking_uri
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
    (["tracking.monitor=val_acc"], "tracking.monitor", "val_accuracy, val_loss"),
    (["tracking.monitor_mode=up"], "tracking.monitor_mode", "auto, min, max"),
    (["model.freeze=-1"], "model.freeze", "none, backbone"),
    (["model.freeze=backbone"], "model.freeze", "model.weights is null"),
    (["trainer.cv_folds=1"], "trainer.cv_folds", "a number of folds >= 2"),
    (["data=tfrecord", "data.path=.", "trainer.cv_folds=3"], "trainer.cv_folds", "cannot be split into folds"),
]


def refuse(args: list[str], cwd: Path, writes_nothing: bool = True) -> tuple[str, subprocess.CompletedProcess]:
    """Run the CLI, check it refused the way a usage error should, and return the error line.
    `writes_nothing`: not even Hydra's outputs/ or multirun/ folder appeared in `cwd`."""
    before = sorted(p.name for p in cwd.iterdir())
    start = time.monotonic()
    result = run_cli(args, cwd=cwd, timeout=120)
    elapsed = time.monotonic() - start
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), result.stderr
    assert elapsed < FAST_S, f"{elapsed:.1f} s to refuse {args}"
    assert_no_runs(cwd)
    if writes_nothing:
        assert sorted(p.name for p in cwd.iterdir()) == before, f"{args} left files behind"
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


@pytest.mark.parametrize(
    ("args", "status", "expected"),
    [
        (["optimizer.learning_rate=0"], 2, "error: optimizer.learning_rate=0"),
        (["optimizer.learnin_rate=0.1"], 2, "error: optimizer.learnin_rate: no such key"),
        (["--multirun", "trainer.epochs=1,0"], 2, "error: trainer.epochs=0"),
        (["--help"], 0, "== Configuration groups =="),
        (["data=image_folder", "data.path=one_class", "trainer.batch_size=2"], 2, "needs at least two"),
    ],
    ids=["bad-value", "misspelt-key", "grid", "help", "image-folder"],
)
def test_bad_value_is_refused_before_tensorflow_is_imported(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], status: int, expected: str
) -> None:
    # Python's -X importtime, as an environment variable, lists every module the CLI imported on stderr.
    # Neither refusals nor --help may load the heavy libraries: each costs seconds before a word is said.
    for i in range(4):  # an image folder with a single class, which only its scan can refuse
        path = workdir / "one_class" / "cats" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i * 60, dtype=np.uint8)).save(path)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    result = run_cli(args, cwd=workdir, timeout=120)
    assert result.returncode == status, result.stderr[-2000:]
    assert expected in result.stdout + result.stderr
    heavy = [line for line in result.stderr.splitlines() if re.search(r"\|\s+(tensorflow|keras|mlflow|optuna)$", line)]
    assert heavy == [], "the CLI imported " + ", ".join(line.rsplit("|", 1)[1].strip() for line in heavy)


@pytest.mark.parametrize(
    "args",
    [[], ["--multirun", "trainer.epochs=1,2"], ["--multirun", "study=lr_batch_decay_dropout"]],
    ids=["run", "grid", "study"],
)
def test_a_tracking_server_that_does_not_answer_is_refused_at_once(workdir: Path, args: list[str]) -> None:
    # MLflow alone would retry for about four minutes and then print a traceback.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket closes
    # A single run is refused inside its Hydra job, which has made its outputs/ folder by then.
    line, _ = refuse([*args, f"tracking.uri={url}"], workdir, writes_nothing=bool(args))
    assert line.startswith(f"error: tracking.uri={url}: no MLflow server answers there"), line
    assert not (workdir / "optuna.db").exists(), "a refused study creates no study"


# --- keys the config does not have ---------------------------------------------------------------------

UNKNOWN_KEYS = [
    (
        ["optimizer.learnin_rate=0.1"],
        "error: optimizer.learnin_rate: no such key; did you mean optimizer.learning_rate?",
    ),
    (
        ["--multirun", "optimizer.learnin_rate=0.1,0.01"],
        "error: optimizer.learnin_rate: no such key; did you mean optimizer.learning_rate?",
    ),
    (
        ["optimzer.learning_rate=0.1"],
        "error: optimzer.learning_rate: no such key; did you mean optimizer.learning_rate?",
    ),
    (["~optimizer.clipnor"], "error: ~optimizer.clipnor: no such key; did you mean optimizer.clipnorm?"),
    # `+` adds a key nothing reads: refused, naming the keys the section has.
    (["+model.freeze_backbone=true"], "error: +model.freeze_backbone: no such key"),
    (["++model.freeze_backbone=true"], "error: ++model.freeze_backbone: no such key"),
    # adam has no momentum: the grid point that lacks the key is named.
    (["--multirun", "optimizer=momentum,adam", "optimizer.momentum=0.5"], "(in the job with optimizer=adam)"),
]


@pytest.mark.parametrize(("args", "expected"), UNKNOWN_KEYS, ids=[" ".join(a) for a, _ in UNKNOWN_KEYS])
def test_unknown_key_is_refused_with_the_nearest_keys(workdir: Path, args: list[str], expected: str) -> None:
    line, _ = refuse(args, workdir)
    assert expected in line, line


def test_an_added_key_is_refused_with_the_keys_of_its_section(workdir: Path) -> None:
    line, _ = refuse(["+model.freeze_backbone=true"], workdir)
    assert line.endswith("model has: name, input_size, dropout, weights, freeze, new_classifier, jit_compile"), line


def test_adding_a_key_that_exists_says_how_to_set_it(workdir: Path) -> None:
    line, _ = refuse(["+trainer.seed=1"], workdir)
    assert line == "error: +trainer.seed=1: trainer.seed is set already; set it with trainer.seed=1", line


def test_a_sweep_without_multirun_is_refused(workdir: Path) -> None:
    line, _ = refuse(["trainer.epochs=1,2"], workdir)
    assert line.startswith("error: trainer.epochs=1,2: a sweep runs with --multirun"), line


@pytest.mark.parametrize(
    "args",
    [["--multirun", "trainer.epochs=1,0"], ["--multirun", "model=small_cnn,resnet50", "model.dropout=0.1,1.5"]],
    ids=["value", "value-across-groups"],
)
def test_every_point_of_a_grid_is_checked_before_the_first_job(workdir: Path, args: list[str]) -> None:
    line, _ = refuse(args, workdir)  # and no multirun/ folder, no store: checked before Hydra starts
    assert re.match(r"error: (trainer\.epochs=0|model\.dropout=1\.5): must be", line), line


def test_override_syntax_error_is_one_line(workdir: Path) -> None:
    line, _ = refuse(["model=["], workdir)
    assert line.startswith("error: model=[: not an override Hydra can read"), line


# --- more bad input (issue 7, 2c) -----------------------------------------------------------------------


def write_zip(path: Path, names: list[str]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, "{}")
    return path


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("model.keras", b"not a zip", "not a Keras archive"),
        ("model.keras", None, "not a Keras archive"),  # a zip without config.json
        ("weights.bin", b"\0" * 64, "neither a Keras archive"),
        ("weights.h5", b"text", "neither a Keras archive"),
    ],
    ids=["text-named-keras", "zip-without-config", "other-file", "h5-not-hdf5"],
)
def test_weights_that_are_not_a_keras_archive_are_refused(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory, name: str, content: bytes | None, expected: str
) -> None:
    weights = tmp_path_factory.mktemp("weights") / name
    if content is None:
        write_zip(weights, ["notes.txt"])
    else:
        weights.write_bytes(content)
    line, _ = refuse([f"model.weights={weights}"], workdir)
    assert line.startswith(f"error: model.weights={weights}: {expected}"), line


def test_a_keras_archive_is_accepted(tmp_path: Path) -> None:
    weights = write_zip(tmp_path / "model.keras", ["config.json", "metadata.json", "model.weights.h5"])
    validate(compose_config([f"model.weights={weights}"]))


def test_a_tracking_uri_mlflow_cannot_use_is_refused(workdir: Path) -> None:
    line, _ = refuse(["tracking.uri=ftp://x"], workdir)
    assert line.startswith("error: tracking.uri=ftp://x: MLflow cannot track there; use null"), line


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///runs.db",
        "http://127.0.0.1:5000",
        "https://mlflow.example.com",
        "postgresql://u@h/db",
        "postgresql+psycopg://u@h/db",
        "mysql://u@h/db",
        "mssql://u@h/db",
        "file:/tmp/mlruns",
        "./mlruns",
        "/tmp/mlruns",
        "databricks",
        "databricks://profile",
    ],
)
def test_tracking_uris_mlflow_supports_are_accepted(uri: str) -> None:
    validate(compose_config([f"tracking.uri='{uri}'"]))


@pytest.mark.parametrize(
    "args",
    [
        ["--multirun", "trainer.epochs=1,2"],
        ["--multirun", "study=lr_batch_decay_dropout"],
        # Past run.py's check (Hydra's own --config-name): the earliest Hydra hook refuses it.
        ["--config-name", "config", "--multirun", "trainer.epochs=1,2"],
    ],
    ids=["grid", "study", "hydra-hook"],
)
def test_joblib_with_no_jobs_is_refused_before_any_store(workdir: Path, args: list[str]) -> None:
    line, _ = refuse([*args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=0"], workdir)
    assert line.startswith("error: hydra.launcher.n_jobs=0: must be the number of jobs"), line


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
    # The folder is scanned inside the Hydra job (once), which has made its outputs/ folder by then.
    line, _ = refuse(["data=image_folder", f"data.path={root}"], workdir, writes_nothing=False)
    assert str(offending) in line, line
    assert allowed in line, line


def test_more_folds_than_a_class_has_images_is_refused(workdir: Path) -> None:
    root = workdir / "images"
    for split, label, count in (("train", "cat", 4), ("train", "dog", 2), ("val", "cat", 1), ("val", "dog", 1)):
        for i in range(count):
            write_png(root / split / label / f"{i}.png")
    args = ["data=image_folder", f"data.path={root}", "trainer.cv_folds=3"]
    line, _ = refuse(args, workdir, writes_nothing=False)
    assert line.startswith("error: trainer.cv_folds=3: class dog has 2 training"), line
