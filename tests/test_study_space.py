"""A study that cannot run is refused with one line and exit status 2 before anything exists: no Optuna
storage, no MLflow store, no trial. Also: the shipped study files, override syntax, and the CLI's imports."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from helpers import ROOT, cli_env, run_cli
from workbench.study import compose, preflight, samplers
from workbench.study.spec import Spec

SHIPPED = sorted(p.stem for p in (ROOT / "studies").glob("*.yaml"))
STUDY = "study=lr_batch_decay_dropout"

INVALID = [
    pytest.param(
        [STUDY, "study.params={model.dropout:{low:0.5,high:0.1}}"],
        "study.params.model.dropout: low=0.5 >= high=0.1",
        id="low>=high",
    ),
    pytest.param(
        [STUDY, "study.params={optimizer.learning_rate:{low:0.0}}"],
        "study.params.optimizer.learning_rate: log scale needs low > 0",
        id="log-with-low<=0",
    ),
    pytest.param(
        [STUDY, "++study.params={optimizer.momentum:{type:float,low:0.5,high:0.99}}"],
        "study.params.optimizer.momentum: the composed config has no key optimizer.momentum",
        id="key-not-in-config",  # adam has no momentum; optimizer=momentum would
    ),
    pytest.param(
        [STUDY, "++study.params={optimizer:{type:categorical,choices:[adam,sgd]}}"],
        "no optimizer named sgd",
        id="group-option-unknown",
    ),
    pytest.param(
        [STUDY, "study.params={model.dropout:{high:1.0}}"],
        "study.params.model.dropout: the value 1.0 makes an invalid config: model.dropout=1.0",
        id="edge-value-invalid",
    ),
    pytest.param([STUDY, "study.sampler.name=annealing"], "study.sampler.name=annealing", id="unknown-sampler"),
    pytest.param([STUDY, "study.pruner.name=patient"], "study.pruner.name=patient", id="unknown-pruner"),
    pytest.param([STUDY, "+study.sampler.n_startup=3"], "study.sampler.n_startup: tpe takes", id="unknown-option"),
    pytest.param(
        ["study=accuracy_vs_size", "study.pruner.name=median"],
        "Optuna cannot prune a multi-objective study",
        id="pruner-with-multi-objective",
    ),
    pytest.param([STUDY, "model=resnet50,small_cnn"], "a study searches with study.params", id="sweep-override"),
    pytest.param([STUDY, "study.metric=val_acc"], "study.metric=val_acc: not one of", id="unknown-metric"),
    pytest.param(
        [STUDY, "trainer.cv_folds=5"],
        "study.pruner.name=percentile: it prunes by epoch, and trainer.cv_folds=5 trials report folds",
        id="cv-with-epoch-pruner",
    ),
    pytest.param([STUDY, "study.pruner.name=wilcoxon"], "set trainer.cv_folds", id="wilcoxon-without-folds"),
    pytest.param(
        [STUDY, "study.pruner.name=median", "+study.pruner.n_warmup_step=4"],
        "study.pruner.n_warmup_step: median takes n_startup_trials, n_warmup_steps",
        id="unknown-pruner-option",
    ),
    pytest.param(
        [STUDY, "study.pruner.name=none", "++study.params={trainer.cv_folds:{type:categorical,choices:[3,5]}}"],
        "study.params.trainer.cv_folds: trials are compared on the same folds",
        id="searching-cv-folds",
    ),
]


@pytest.mark.parametrize("args, message", INVALID)
def test_invalid_study_is_refused_before_anything_exists(args: list[str], message: str, workdir: Path) -> None:
    result = run_cli(["--multirun", *args], cwd=workdir, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    # Refused before storage, MLflow store, runs or trials were created.
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()


def test_a_study_needs_multirun(workdir: Path) -> None:
    result = run_cli([STUDY], cwd=workdir, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: a study runs its trials through the study sweeper: add --multirun (python run.py --multirun study=...)"
    ]


def test_unknown_study_names_the_study_files(workdir: Path) -> None:
    result = run_cli(["--multirun", "study=nope"], cwd=workdir, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: study=nope: no such study; choose one of: {', '.join(SHIPPED)}"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_studies_pass_preflight(name: str) -> None:
    spec = Spec.from_config(compose.compose([f"study={name}"]).study, default_name=name)
    cfg = preflight.preflight(spec, [])
    assert spec.name == name and spec.budget and cfg.model.name


def test_the_shipped_studies_search_what_the_issue_names() -> None:
    def spec(name: str) -> Spec:
        return Spec.from_config(compose.compose([f"study={name}"]).study, default_name=name)

    four = {"optimizer.learning_rate", "trainer.batch_size", "schedule.decay_factor", "model.dropout"}
    for name in ("lr_batch_decay_dropout", "nasnet_large_momentum"):
        params = {p.key: p for p in spec(name).params}
        assert set(params) == four
        assert params["optimizer.learning_rate"].log and params["trainer.batch_size"].type == "categorical"
    nasnet = preflight.preflight(spec("nasnet_large_momentum"), [])
    assert (nasnet.model.name, nasnet.optimizer.name) == ("nasnet_large", "momentum")
    assert spec("accuracy_vs_size").multi_objective


def test_another_pruner_leaves_the_study_files_pruner_options(caplog: pytest.LogCaptureFixture) -> None:
    # The file's percentile pruner takes a percentile; median does not.
    spec = Spec.from_config(compose.compose([STUDY, "study.pruner.name=median"]).study, default_name="s")
    with caplog.at_level(logging.WARNING):
        pruner = samplers.make_pruner(spec, preflight.preflight(spec, []))
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert "study.pruner.name=median: not taking percentile (the study file's pruner options)" in caplog.text


@pytest.mark.parametrize("value", [1e-05, 0.1, 3, True, None, "small_cnn", "a b", "1e5", "it's"])
def test_assign_reads_back_as_the_same_value(value: object) -> None:
    cfg = compose.compose(["+probe=0", compose.assign("probe", value)])
    assert cfg.probe == value and type(cfg.probe) is type(value)


def test_merge_keeps_the_last_override_of_each_key() -> None:
    merged = compose.merge(["model=small_cnn", "trainer.epochs=6"], ["trainer.epochs=2"], ["model=resnet50"])
    assert merged == ["trainer.epochs=2", "model=resnet50"]


def test_the_workbench_command_does_not_import_tensorflow() -> None:
    code = "import workbench.cli, sys; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env(), timeout=60)
