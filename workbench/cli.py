"""The `workbench` command: look at a study while or after it runs, and predict with a logged model.

    workbench study status lr_batch_decay_dropout     # trials by state, best value and parameters, elapsed
    workbench study best lr_batch_decay_dropout       # the `python run.py ...` command that retrains the best
    workbench study best lr_batch_decay_dropout --register digits-cnn   # its model as models:/digits-cnn@champion
    workbench study report lr_batch_decay_dropout     # Optuna's plots and the best config, written to a folder
    workbench study gc lr_batch_decay_dropout --keep-models 2 --dry-run   # delete all but the best trials' models
    workbench predict <run id> photo.jpg photos/      # the top classes of each image, by name
    workbench data build ~/flowers ~/flowers-records  # an image folder as sharded TFRecords (data=tfrecord)
    workbench eval <run id> [data=... data.path=...] [--crops 10]   # top-1/top-5, per class, confusion matrix
    workbench sync [checkpoints]                      # send what runs kept while the tracking server was away
    workbench models --input-size 128 --classes 5     # each architecture's parameters, GMACs and memory
    workbench lr-find model=resnet50 data=...         # the learning-rate range test: a rate and a study range

The study file (studies/<name>.yaml) names the storage and the Optuna study; `--storage URL` or any
`study.<key>=<value>` override given at launch (e.g. study.name=...) points elsewhere. Only `predict`,
`eval`, `models` and `lr-find` load TensorFlow.
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
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.topic == "eval" and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # data overrides after an option: `eval <run> --crops 10 data.path=...`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.topic == "predict":
        return predict(args)
    if args.topic == "data":
        return data_build(args)
    if args.topic == "eval":
        return evaluate(args)
    if args.topic == "sync":
        return sync(args)
    if args.topic == "models":
        return models(args)
    if args.topic == "lr-find":
        return lr_find(args)
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
        ("gc", gc, "delete the logged models and checkpoints of all but the best trials (study.keep)"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("name", help="the study file's name (studies/<name>.yaml)")
        command.add_argument("overrides", nargs="*", help="study.<key>=<value> overrides given at launch")
        command.add_argument("--storage", metavar="URL", help="the Optuna storage, instead of the study file's")
        command.set_defaults(command=function)
    commands.choices["best"].add_argument("--trial", type=int, help="the command for this trial number instead")
    commands.choices["best"].add_argument(
        "--register", metavar="MODEL", help="register its logged model as a version of MODEL, alias champion"
    )
    commands.choices["best"].add_argument(
        "--tracking-uri", help="with --register: the MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    commands.choices["report"].add_argument("--out", type=Path, help="the folder to write (default: reports/<name>)")
    gc_command = commands.choices["gc"]
    for kind in ("models", "checkpoints"):
        gc_command.add_argument(
            f"--keep-{kind}", type=int, metavar="K", help=f"the best K trials keep their {kind} (default: study.keep)"
        )
    gc_command.add_argument("--dry-run", action="store_true", help="list what would be deleted and the bytes freed")
    gc_command.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")

    text = "the top classes of image files, by name, from a run's logged model"
    command = topics.add_parser("predict", help=text, description=text)
    command.add_argument("model", help="a run id, runs:/<run id>/model or models:/<name>@<alias>")
    command.add_argument("files", nargs="+", help="image files, and folders to search for them")
    command.add_argument("--top", type=int, default=3, help="classes shown per image (default: 3)")
    command.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")

    data = topics.add_parser("data", help="prepare data: an image folder as sharded TFRecords")
    text = "write an image folder as sharded TFRecords, labels.txt and manifest.json, for data=tfrecord"
    command = data.add_subparsers(title="commands", required=True).add_parser("build", help=text, description=text)
    command.add_argument("src", help="an image folder, as data=image_folder reads it")
    command.add_argument("out", help="the folder to write (data.path of data=tfrecord)")
    command.add_argument("--val-fraction", type=float, default=0.2, help="held out per class without val/ (0.2)")
    command.add_argument("--images-per-shard", type=int, default=1024, help="about this many per shard (1024)")
    command.add_argument("--workers", type=int, help="processes writing shards (default: one per CPU core)")
    command.add_argument("--overwrite", action="store_true", help="replace the records of another dataset in OUT")

    text = "top-1, top-5, per-class metrics and the confusion matrix of a model, logged to its MLflow run"
    command = topics.add_parser(
        "eval",
        help=text,
        description=f"{text}. Without data overrides: the run's own validation split. With them: every image "
        "of that source (training and validation splits together; add data.val_fraction=F for its validation "
        "split only). A .keras checkpoint file is logged to a new run tagged workbench.checkpoint.",
    )
    command.add_argument("model", help="a run id, runs:/<run id>/model, models:/<name>@<alias> or a .keras file")
    command.add_argument(
        "overrides", nargs="*", help="data to evaluate on instead, e.g. data=image_folder data.path=~/holdout"
    )
    command.add_argument(
        "--crops",
        default="1",
        metavar="{1,10}",
        help="1: the validation resize (default); 10: resize the shorter side to round(size/0.875), four "
        "corners and the centre, each mirrored, probabilities averaged",
    )
    command.add_argument("--batch-size", default="64", metavar="N", help="model inputs per batch (default: 64)")
    command.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")

    text = "send what runs kept in their outbox while the tracking store was away, in order"
    command = topics.add_parser("sync", help=text, description=text)
    command.add_argument(
        "paths", nargs="*", default=["checkpoints"], help="outbox folders, or folders holding them (checkpoints)"
    )
    command.add_argument("--tracking-uri", help="the MLflow store, instead of the one each run was logged to")

    text = "each architecture's parameters, multiply-accumulates and memory at an input size, to choose one"
    command = topics.add_parser("models", help=text, description=text)
    command.add_argument("names", nargs="*", help="architectures of the model group (default: every one)")
    command.add_argument("--input-size", type=int, help="image side in pixels (default: each one's native size)")
    command.add_argument("--classes", type=int, default=1000, help="outputs of the classifier head (1000)")
    command.add_argument("--batch-size", type=int, default=32, help="for activation memory and --measure (32)")
    command.add_argument("--optimizer", default="adam", help="an option of the optimizer group, for its state (adam)")
    command.add_argument("--measure", action="store_true", help="also time a few training steps on this machine")
    command.add_argument("--max-gmacs", type=float, help="leave out architectures above this many GMACs an image")
    command.add_argument("--max-params", metavar="N", help="leave out architectures above N parameters (e.g. 30M)")
    command.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output (table)")

    text = "the learning-rate range test: a short exponential ramp of the learning rate on the composed config"
    command = topics.add_parser(
        "lr-find",
        help=text,
        description=f"{text}; prints the learning rate where the smoothed loss falls fastest and a range for a "
        "study, and logs the curve to an MLflow run tagged workbench.kind=lr_find",
    )
    command.add_argument("overrides", nargs="*", help="python run.py overrides: model=..., data=..., optimizer=...")
    command.add_argument("--min", type=float, default=1e-7, help="the first learning rate (1e-7)")
    command.add_argument("--max", type=float, default=10.0, help="the last learning rate (10)")
    command.add_argument("--steps", type=int, default=100, help="batches, each at a higher rate (100)")
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
    failed = ", ".join(f"{cause} {n}" for cause, n in tally.by_cause(trials).items())
    for state in ("complete", "pruned", "failed", "running", "waiting"):
        print(f"    {state:<9}{getattr(counts, state):>5}" + (f"  ({failed})" if state == "failed" and failed else ""))
    print(f"  elapsed  {_elapsed(trials)}")
    print("\n".join(report.best_lines(study, spec)))


def best(study: optuna.Study, spec: Spec, args: argparse.Namespace) -> None:
    from workbench.study import report

    if args.register is not None:
        return register(study, spec, args)
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


def register(study: optuna.Study, spec: Spec, args: argparse.Namespace) -> None:
    from mlflow.exceptions import MlflowException

    from workbench.config import first_line
    from workbench.predict import use_store
    from workbench.study import registry, report

    try:
        registry.check_name(f"--register {args.register}", args.register)
        trial = registry.trial_to_register(study, spec, args.trial)
        use_store(args.tracking_uri)
        registered = registry.register(trial, spec, args.register)
    except ConfigError as exc:
        fail(str(exc))
    except MlflowException as exc:  # the store refused, or is away: not the user's input
        fail(f"--register {args.register}: {redact(first_line(exc))}", status=1)
    print("\n".join(registered.lines(spec, report.values_text(spec, trial))))


def report(study: optuna.Study, spec: Spec, args: argparse.Namespace) -> None:
    from workbench.study import report as study_report

    folder = args.out or Path("reports") / spec.name
    written = study_report.write_best(study, spec, folder) + study_report.write_plots(study, spec, folder / "plots")
    print(f"Wrote {len(written)} files to {folder}/:")
    for path in written:
        print(f"  {path.relative_to(folder)}")


def gc(study: optuna.Study, spec: Spec, args: argparse.Namespace) -> None:
    from workbench.chooser import size_text
    from workbench.predict import use_store
    from workbench.study import keep
    from workbench.study.spec import Keep

    policy = spec.keep or Keep(None, None)
    try:
        for kind in ("models", "checkpoints"):
            given = getattr(args, f"keep_{kind}")
            if given is not None and given < 0:
                raise ConfigError(f"--keep-{kind} {given}: a number of trials, 0 or more")
        policy = Keep(
            policy.models if args.keep_models is None else args.keep_models,
            policy.checkpoints if args.keep_checkpoints is None else args.keep_checkpoints,
        )
        if policy == Keep(None, None):
            raise ConfigError(
                f"study {spec.name} keeps everything (study.keep: null): give --keep-models or --keep-checkpoints"
            )
        store = use_store(args.tracking_uri)
    except ConfigError as exc:
        fail(str(exc))
    deletions = keep.apply(study, policy, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for d in deletions:
        print(f"trial {d.trial}: {verb} {d.kind} of run {d.run_id} ({size_text(d.bytes)})")
    kept = ", ".join(
        f"the best {n} keep their {kind}" if n else f"no trial keeps its {kind}"
        for kind, n in (("models", policy.models), ("checkpoints", policy.checkpoints))
        if n is not None
    )
    freed = size_text(sum(d.bytes for d in deletions))
    print(f"Study {spec.name} in {store}: {kept}; {'would free' if args.dry_run else 'freed'} {freed}")


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


def evaluate(args: argparse.Namespace) -> None:
    from workbench import eval_report
    from workbench import evaluate as evaluation

    try:
        crops = evaluation.option("--crops", args.crops, evaluation.CROPS)
        batch_size = evaluation.option("--batch-size", args.batch_size)
        outcome = evaluation.evaluate(args.model, args.overrides, crops, batch_size, args.tracking_uri)
    except ConfigError as exc:
        fail(str(exc))
    report = outcome.report
    print(f"Evaluated {args.model} on {outcome.data}, {crops} crop{'s' if crops > 1 else ''} an image")
    print("\n".join(eval_report.table(report)))
    where = "a new run" if outcome.new_run else "run"
    print(f"Logged to {where} {outcome.run_id}: metrics eval_{report.dataset}_*, artifacts {outcome.artifact_path}/")


def data_build(args: argparse.Namespace) -> None:
    from workbench import records, signals

    try:
        with signals.stop_on_signals():  # Ctrl-C and a scheduler's SIGTERM alike
            manifest = records.build(
                args.src, args.out, args.val_fraction, args.images_per_shard, args.workers, args.overwrite
            )
    except ConfigError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        stopped = f"stopped; {args.out} is unfinished (no {records.MANIFEST}): run the same command again"
        fail(stopped, signals.exit_status())
    splits = manifest["splits"]
    print(
        f"Wrote {splits['train']['count']} training and {splits['validation']['count']} validation images in "
        f"{len(splits['train']['shards'])} + {len(splits['validation']['shards'])} shards to {args.out}"
    )
    if manifest["skipped"]:
        print(f"Skipped {manifest['skipped']} unreadable image file(s), listed in {args.out}/{records.SKIPPED}")
    print(f"Train on them: python run.py data=tfrecord data.path={args.out}")


def sync(args: argparse.Namespace) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from workbench import outbox
    from workbench.config import first_line, sqlalchemy_url

    try:
        boxes = outbox.find([Path(p) for p in args.paths])
    except ConfigError as exc:
        fail(str(exc))
    if not boxes:
        print(f"Nothing to send: no outbox in {', '.join(args.paths)}")
        return
    left = 0
    for box in boxes:
        uri = args.tracking_uri or box.tracking_uri
        if uri is None:
            fail(f"{box.folder}: its tracking store's URI holds a password, so it was not kept: give --tracking-uri")
        try:
            box.lock()
        except ConfigError as exc:
            print(f"Skipped {exc}")
            left += 1
            continue
        mlflow.set_tracking_uri(sqlalchemy_url(uri))
        count, why = box.pending(), f"{redact(uri)} is away"
        try:
            sent = box.send()
        except MlflowException as exc:  # refused, not away: e.g. the run was deleted
            sent, why = False, f"{redact(uri)} refused it: {redact(first_line(exc))}"
        box.unlock()
        if sent and box.folder.exists():  # sent, but the run has not ended: its process stopped first
            print(f"Sent run {box.run_id}: {count} items; it did not end (resume it, or delete {box.folder})")
        elif sent:
            print(f"Sent run {box.run_id}: {count} items to {redact(uri)}")
        else:
            left += 1
            print(f"Run {box.run_id}: {box.pending()} items still wait in {box.folder} ({why})")
    if left:
        raise SystemExit(1)


def models(args: argparse.Namespace) -> None:
    import csv
    import json

    from workbench import chooser
    from workbench.study import compose

    try:
        names = chooser.names(args.names)
        for option, value in (("--classes", args.classes), ("--batch-size", args.batch_size)):
            if value < 1:
                raise ConfigError(f"{option} {value}: must be at least 1")
        if args.input_size is not None and args.input_size < 1:
            raise ConfigError(f"--input-size {args.input_size}: must be at least 1")
        optimizers = compose.group_options("optimizer")
        if args.optimizer not in optimizers:
            raise ConfigError(f"--optimizer {args.optimizer}: the optimizer group has: {', '.join(optimizers)}")
        budget = chooser.Budget(args.max_gmacs, chooser.parse_count("--max-params", args.max_params))
        if args.names:  # named, and too small for one of them: refused before anything is built
            for name in names:
                if why := chooser.too_small(name, args.input_size):
                    raise ConfigError(why)
    except ConfigError as exc:
        fail(str(exc))
    rows, left_out = [], []
    for name in names:
        if why := chooser.too_small(name, args.input_size):
            left_out.append(f"{name}: {why}")
            continue
        row = chooser.profile(
            name, args.input_size, args.classes, args.batch_size, args.optimizer, args.measure, budget
        )
        if why := budget.over(row):
            left_out.append(f"{name}: {why}")
        else:
            rows.append(row)
    if args.format == "json":
        print(json.dumps([row.as_dict() for row in rows], indent=2))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(chooser.Row.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(row.as_dict() for row in rows)
    else:
        print(
            f"{args.classes} classes, batch {args.batch_size}, optimizer {args.optimizer}; GMACs per image, "
            "memory in float32 (activations: one training batch)"
        )
        print("\n".join(chooser.table(rows)))
    for line in left_out:  # on stderr, so CSV and JSON stay clean
        print(f"left out {line}", file=sys.stderr)


def lr_find(args: argparse.Namespace) -> None:
    from workbench import lr_find as finder
    from workbench import signals
    from workbench.precheck import check_overrides
    from workbench.server import check_server
    from workbench.study import compose

    try:
        finder.check_range(args.min, args.max, args.steps)
        check_overrides(args.overrides, compose.CONF, multirun=False)
        cfg, context = compose.compose_run(args.overrides)
        check_server(cfg.tracking)
        with signals.stop_on_signals():
            found = finder.find(cfg, context, args.min, args.max, args.steps)
    except ConfigError as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # the probe's run has ended KILLED; nothing to go on from
        fail("stopped; the learning-rate range test keeps nothing: run it again", signals.exit_status())
    curve = found.curve
    print(f"Learning-rate range test: {len(curve.losses)} steps from {args.min:g} to {curve.learning_rates[-1]:.3g}")
    print(f"  stopped: {curve.stop}; MLflow run {found.run_id} (lr_find/lr_find.png, lr_find/lr_find.csv)")
    if found.suggested is None:
        fail(
            f"no suggestion: the loss did not fall from --min {args.min:g} and diverged after {len(curve.losses)} "
            "steps, so the range starts past where training diverges: lower --min (the default is 1e-7)",
            status=1,
        )
    from workbench import tracking  # MLflow: not loaded for a refusal

    low, high = curve.search_range(found.suggested)
    print(f"Suggested: optimizer.learning_rate={found.suggested:.3g}")
    print("For a study file (studies/<name>.yaml), under study.params:")
    print(f"  optimizer.learning_rate: {{type: float, low: {low:.3g}, high: {high:.3g}, log: true}}")
    print(f"  Compare runs: {tracking.ui_hint(found.run_id)}")


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
