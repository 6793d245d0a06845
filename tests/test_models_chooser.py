"""`workbench models`, the architecture chooser: counts from the built Keras models against the papers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from helpers import workbench_cli

# (parameters, mult-adds) at native size with 1,000 classes. NASNet-A Large: Zoph et al. 2018, Table 2.
# ResNet-50: He et al. 2016, Table 1 (3.8 G; the 4.1 G often quoted is "v1.5", torchvision's, with the stride on
# the 3x3 conv; keras.applications' ResNet50 is v1). Inception-v3: Szegedy et al. 2016, Table 3 (5.72 G).
PUBLISHED = {"nasnet_large": (88.9e6, 23.8), "resnet50": (25.6e6, 3.8), "inception_v3": (23.8e6, 5.72)}


def test_counts_match_the_published_figures_at_native_size(workdir: Path) -> None:
    result = workbench_cli(["models", *PUBLISHED, "--format", "json"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert list(rows) == list(PUBLISHED)
    for name, (parameters, gmacs) in PUBLISHED.items():
        row = rows[name]
        assert row["parameters"] == pytest.approx(parameters, rel=0.03), name
        assert row["gmacs"] == pytest.approx(gmacs, rel=0.03), name
        assert row["input_size"] == row["native_input_size"]
        assert 0 < row["trainable_parameters"] <= row["parameters"]
        # Adam keeps two slots a weight: weights plus state are about three times the weights in float32.
        assert row["weights_and_optimizer_bytes"] == pytest.approx(3 * 4 * row["parameters"], rel=0.02)
    assert rows["nasnet_large"]["activation_bytes"] > rows["resnet50"]["activation_bytes"] > 0


def test_a_budget_leaves_rows_out_and_says_why_and_measure_times_training(workdir: Path) -> None:
    args = ["models", "small_cnn", "mobilenet_v2", "--input-size", "32", "--classes", "5", "--batch-size", "8"]
    # At 32 pixels small_cnn needs 0.0103 GMACs an image with 5 classes, mobilenet_v2 0.006 (and 2.2 M parameters).
    result = workbench_cli([*args, "--max-gmacs", "0.008", "--format", "csv"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = list(csv.DictReader(io.StringIO(result.stdout)))
    assert row["name"] == "mobilenet_v2" and row["input_size"] == "32" and row["images_per_second"] == ""
    assert "left out small_cnn: 0.0103 GMACs > --max-gmacs 0.008" in result.stderr, result.stderr[-2000:]

    # Measured: small_cnn only, the row left after the budget (timing mobilenet_v2 would compile it for 30 s).
    table = workbench_cli([*args, "--max-params", "1M", "--measure"], workdir)
    assert table.returncode == 0, table.stderr[-3000:]
    header, small = table.stdout.splitlines()[1:3]
    assert header.split()[:3] == ["architecture", "input", "native"] and small.split()[:2] == ["small_cnn", "32"]
    assert header.split()[-1] == "images/s" and float(small.split()[-1]) > 0
    assert "left out mobilenet_v2: " in table.stderr and "parameters > --max-params 1.0M" in table.stderr


def test_an_architecture_too_small_for_the_input_is_left_out_saying_why(workdir: Path) -> None:
    result = workbench_cli(["models", "--input-size", "16", "--format", "json"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["name"] for row in json.loads(result.stdout)] == ["small_cnn"]
    assert "left out inception_v3: --input-size 16 is below inception_v3's minimum of 75" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["models", "vgg16"], "error: unknown architecture 'vgg16'; the model group has: small_cnn, nasnet_large"),
        (["models", "inception_v3", "--input-size", "64"], "error: --input-size 64 is below inception_v3's minimum"),
        (["models", "--max-params", "lots"], "error: --max-params lots: must be a positive number"),
        (["models", "--classes", "0"], "error: --classes 0: must be at least 1"),
        (["models", "--optimizer", "lion"], "error: --optimizer lion: the optimizer group has: adam"),
    ],
    ids=["unknown", "too-small", "max-params", "classes", "optimizer"],
)
def test_bad_input_is_refused_in_one_line(workdir: Path, args: list[str], message: str) -> None:
    result = workbench_cli(args, workdir)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not list(workdir.iterdir()), "nothing written"
