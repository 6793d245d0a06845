"""The `workbench` command: look at a study while or after it runs, and predict with a logged model.

    workbench study status lr_batch_decay_dropout     # trials by state, best value and parameters, elapsed
    workbench study best lr_batch_decay_dropout       # the `python run.py ...` command that retrains the best
    workbench study report lr_batch_decay_dropout     # Optuna's plots and the best config, written to a folder
    workbench predict <run id> photo.jpg photos/      # the top classes of each image, by name

The study file (studies/<name>.yaml) names the storage and the Optuna study; `--storage URL` or any
`study.<key>=<value>` override given at launch (e.g. study.name=...) points elsewhere. Only `predict`
loads TensorFlow.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.app import fail
from workbench.config import ConfigError, redact
from workbench.study.spec import Spec

if TYPE_CHECKING:
    import optuna


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.topic == "predict":
        return predict(args)
    try:
        spec, study = _load(args.name, args.storage, args.overrides)
    except ConfigError as exc:
        fail(str(exc))
    args.command(study, spec, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    topics = parser.add_subparsers(title="commands", required=True, dest="topic")
    study = topics.add_parser("study", help="look at an Optuna study (python run.py --multirun study=<name>)")
    commands = study.add_subparsers(title="commands", required=True)
    for name, function, text in (
        ("status", status, "trials by state, the best value and parameters, elapsed time"),
        ("best", best, "the python run.py command that retrains the best trial (each Pareto trial)"),
        ("report", report, "write Optuna's plots and the best config to a folder"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("name", help="the study file's name (studies/<name>.yaml)")
        command.add_argument("overrides", nargs="*", help="study.<key>=<value> overrides given at launch")
        command.add_argument("--storage", metavar="URL", help="the Optuna storage, instead of the study file's")
        command.set_defaults(command=function)
    commands.choices["best"].add_argument("--trial", type=int, help="the command for this trial number instead")
    commands.choices["report"].add_argument("--out", type=Path, help="the folder to write (default: reports/<name>)")

    text = "the top classes of image files, by name, from a run's logged model"
    command = topics.add_parser("predict", help=text, description=text)
    command.add_argument("model", help="a run id, runs:/<run id>/model or models:/<name>@<alias>")
    command.add_argument("files", nargs="+", help="image files, and folders to search for them")
    command.add_argument("--top", type=int, default=3, help="classes shown per image (default: 3)")
    command.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    return parser


def _load(name: str, storage_url: str | None, overrides: list[str]) -> tuple[Spec, optuna.Study]:
    import optuna

    from workbench.study import compose, storage

    studies = compose.group_options("study")
    if name not in studies:
        raise ConfigError(f"no study file studies/{name}.yaml; the study files are: {', '.join(studies)}")
    bad = [o for o in overrides if not compose.is_study_override(o)]
    if bad:
        raise ConfigError(f"{bad[0]}: only study.<key>=<value> overrides point at a study")
    extra = [compose.assign("study.storage", storage_url)] if storage_url else []
    spec = Spec.from_config(compose.compose([f"study={name}", *overrides, *extra]).study, default_name=name)
    database = storage.sqlite_file(spec.storage)
    if database is not None and not database.is_file():  # opening it would create an empty one
        raise ConfigError(f"no {database} here: run where the study was launched, or pass --storage")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return storage.load_study(spec)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; launch it: python run.py --multirun study={name}") from None


def status(study: optuna.Study, spec: Spec, args: argparse.Namespace) -> None:
    from workbench.study import report, tally

    trials = study.get_trials(deepcopy=False)
    counts = tally.count(trials)
    objective = ", ".join(f"{d} {m}" for m, d in zip(spec.metrics, spec.directions, strict=True))
    budget = f" of {spec.budget}" if spec.budget else ""
    print(f"Study {spec.name} ({objective}) in {redact(spec.storage)}")
    print(f"  trials   {counts.finished}{budget} finished")
    for state in ("complete", "pruned", "failed", "running", "waiting"):
        print(f"    {state:<9}{getattr(counts, state):>5}")
    print(f"  elapsed  {_elapsed(trials)}")
    print("\n".join(report.best_lines(study, spec)))


def best(study: optuna.Study, spec: Spec, args: argparse.Namespace) -> None:
    from workbench.study import report

    if args.trial is not None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == args.trial and "overrides" in t.user_attrs]
        if not trials:
            fail(f"--trial {args.trial}: study {spec.name} has no such trial that started training")
    else:
        trials = report.best_trials(study, spec)
        if not trials:
            fail(f"study {spec.name} has no complete trial yet")
    for trial in trials:
        if spec.multi_objective or args.trial is not None:
            print(f"# trial {trial.number}: {report.values_text(spec, trial) if trial.values else trial.state.name}")
        print(report.retrain_command(trial, spec))


def report(study: optuna.Study, spec: Spec, args: argparse.Namespace) -> None:
    from workbench.study import report as study_report

    folder = args.out or Path("reports") / spec.name
    written = study_report.write_best(study, spec, folder) + study_report.write_plots(study, spec, folder / "plots")
    print(f"Wrote {len(written)} files to {folder}/:")
    for path in written:
        print(f"  {path.relative_to(folder)}")


def predict(args: argparse.Namespace) -> None:
    from workbench import predict as model

    try:
        if args.top < 1:
            raise ConfigError(f"--top {args.top}: must be at least 1")
        uri, files = model.model_uri(args.model), model.image_files(args.files)
        keras_model, metadata = model.load(uri, args.tracking_uri)
    except ConfigError as exc:
        fail(str(exc))
    predictions, skipped = model.predict(keras_model, metadata, files, args.top)
    for line in skipped:
        print(line, file=sys.stderr)
    width = max((len(str(p.file)) for p in predictions), default=0)
    for p in predictions:
        print(f"{p.file!s:<{width}}  " + "  ".join(f"{name} {probability:.3f}" for name, probability in p.top))


def _elapsed(trials: list[optuna.trial.FrozenTrial]) -> str:
    """From the first trial's start to the last one's end (or now, while trials run)."""
    from workbench.study.report import duration

    starts = [t.datetime_start for t in trials if t.datetime_start]
    if not starts:
        return "no trial has started"
    running = any(t.datetime_start and not t.datetime_complete for t in trials)
    end = datetime.datetime.now() if running else max(t.datetime_complete for t in trials if t.datetime_complete)
    until = "now" if running else f"{end:%H:%M}"
    return f"{duration((end - min(starts)).total_seconds())} ({min(starts):%Y-%m-%d %H:%M} to {until})"


if __name__ == "__main__":
    main(sys.argv[1:])
