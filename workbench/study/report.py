"""What a study leaves behind: its best trials as ready-to-run configs and commands, Optuna's plots as
PNG (matplotlib; plotly's PNG export needs Chrome) and together in one interactive HTML page (plotly), and
the closing summary.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from workbench.config import redacted_yaml
from workbench.study import causes, compose, tally
from workbench.study.spec import Spec

log = logging.getLogger(__name__)
SINGLE_OBJECTIVE_PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")
MULTI_OBJECTIVE_PLOTS = ("pareto_front", "param_importances", "parallel_coordinate")


def best_trials(study: optuna.Study, spec: Spec) -> list[FrozenTrial]:
    """The best trial, or the Pareto front of a multi-objective study; empty before any trial completed."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        return []
    if spec.multi_objective:
        return sorted(study.best_trials, key=lambda t: t.number)
    best = tally.best(spec, trials)  # never None here: every trial in `trials` is complete
    return [best] if best is not None else []


def retrain_command(trial: FrozenTrial, spec: Spec) -> str:
    """`python run.py ...`: the study's base overrides, the user's overrides and the trial's parameters;
    the run it starts is named `retrain-trial-<n>-<study>` and tagged with the study and trial it reproduces."""
    name = compose.assign("tracking.run_name", f"retrain-trial-{trial.number}-{spec.name}")
    entries = [compose.assign("reproduces_study", spec.name), compose.assign("reproduces_trial", trial.number)]
    tags = "tracking.tags={" + ", ".join(e.replace("=", ": ", 1) for e in entries) + "}"  # a Hydra dict
    overrides = trial.user_attrs["overrides"]
    # A cross-validated trial is retrained once on the whole training split and checked on the held-out one.
    whole = (
        [compose.assign("trainer.cv_folds", None)]
        if any(compose.key_of(o) == "trainer.cv_folds" for o in overrides)
        else []
    )
    return compose.command(compose.merge(overrides, [*whole, name, tags]))


def values_text(spec: Spec, trial: FrozenTrial) -> str:
    return "  ".join(f"{m}={v:.6g}" for m, v in zip(spec.metrics, trial.values, strict=True))


def write_best(study: optuna.Study, spec: Spec, folder: Path) -> list[Path]:
    """best_config.yaml (trial-N.yaml for each Pareto trial) and retrain_command.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    trials = best_trials(study, spec)
    written, commands = [], []
    for trial in trials:
        name = f"trial-{trial.number}.yaml" if spec.multi_objective else "best_config.yaml"
        command = retrain_command(trial, spec)
        header = (
            f"# Trial {trial.number} of study {spec.name}: {values_text(spec, trial)}\n"
            f"# Retrain: {command}\n"
            f"# Or run this file: python run.py --config-dir <this folder> --config-name {Path(name).stem}\n"
        )
        path = folder / name
        path.write_text(header + redacted_yaml(compose.compose(trial.user_attrs["overrides"])))
        written.append(path)
        commands.append(f"# trial {trial.number}: {values_text(spec, trial)}\n{command}\n")
    if commands:
        path = folder / "retrain_command.txt"
        path.write_text("".join(commands))
        written.append(path)
    return written


def trials_csv(spec: Spec, trials: list[FrozenTrial]) -> str:
    """One row per trial: number, state, cause of a failure, parameters, values, epochs reported (folds,
    with trainer.cv_folds) and MLflow run id."""
    import csv
    import io

    params = list(dict.fromkeys([p.key for p in spec.params] + [k for t in trials for k in t.params]))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", "failure", *params, *spec.metrics, "epochs", "mlflow_run_id"])
    for t in trials:
        values = t.values if t.values is not None else [None] * len(spec.metrics)
        failure = causes.of_trial(t) if t.state == TrialState.FAIL else ""
        row = [t.number, t.state.name, failure, *(t.params.get(k) for k in params), *values]
        writer.writerow([*row, len(t.intermediate_values), t.user_attrs.get("mlflow_run_id", "")])
    return out.getvalue()


def importances(study: optuna.Study, spec: Spec) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA) for the first metric; empty until they can be computed."""
    target = (lambda t: t.values[0]) if spec.multi_objective else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, target=target))
    except Exception as exc:  # fewer than two complete trials, or parameters that never varied
        log.debug("No parameter importances yet: %s", exc)
        return {}


def write_plots(study: optuna.Study, spec: Spec, folder: Path) -> list[Path]:
    """Optuna's study plots: each as a .png, and all of them, interactive, in one plots.html; a plot the
    study cannot draw yet is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as interactive
    import optuna.visualization.matplotlib as static

    folder.mkdir(parents=True, exist_ok=True)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    written, figures = [], {}
    plots = MULTI_OBJECTIVE_PLOTS if spec.multi_objective else SINGLE_OBJECTIVE_PLOTS
    for plot in plots:
        options = _plot_options(spec, plot)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API and too-few-trials warnings
                figure = _call(getattr(interactive, f"plot_{plot}"), study, options)
                axes = _call(getattr(static, f"plot_{plot}"), study, options)
        except Exception as exc:  # e.g. importances need two complete trials with varied parameters
            log.info("Skipping the %s plot: %s", plot, exc)
            continue
        png = folder / f"{plot}.png"
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        first.figure.savefig(png, dpi=100, bbox_inches="tight")
        plt.close(first.figure)
        figures[plot] = figure
        written.append(png)
    if figures:
        written.insert(0, _write_html(figures, f"Study {spec.name}", folder / "plots.html"))
    return written


def _write_html(figures: dict[str, Any], title: str, path: Path) -> Path:
    """All interactive plots in one page that carries plotly.js once (4.8 MB; one copy per plot made a study's
    plots 19 MB). Inlined, not from a CDN, so it works offline; and one self-contained file, not
    include_plotlyjs="directory": the MLflow UI shows an HTML artifact from a blob: URL in a sandboxed iframe,
    where a script beside the file cannot be loaded."""
    import html

    sections = [
        f"<h2>{html.escape(name.replace('_', ' '))}</h2>\n"
        + figure.to_html(full_html=False, include_plotlyjs=index == 0, default_width="100%")
        for index, (name, figure) in enumerate(figures.items())
    ]
    path.write_text(
        f'<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f"<body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "\n</body>\n</html>\n",
        encoding="utf-8",
    )
    return path


def _plot_options(spec: Spec, plot: str) -> dict[str, Any]:
    if plot == "pareto_front":
        return {"target_names": list(spec.metrics)}
    if spec.multi_objective:  # importances and coordinates of the first metric
        return {"target": lambda t: t.values[0], "target_name": spec.metrics[0]}
    return {"target_name": spec.metrics[0]}


def _call(function: Callable, study: optuna.Study, options: dict[str, Any]) -> Any:
    import inspect

    accepted = inspect.signature(function).parameters
    return function(study, **{k: v for k, v in options.items() if k in accepted})


def summary(study: optuna.Study, spec: Spec, tracking_hint: str) -> str:
    """The closing lines: counts, the best trial (or the Pareto front), its run and its retrain command."""
    counts = tally.count(study.get_trials(deepcopy=False))
    lines = [
        f"Study {spec.name}: {counts.finished} trials finished ({counts.complete} complete, "
        f"{counts.pruned} pruned), {counts.failed} failed, {counts.running} running",
        *best_lines(study, spec),
        f"Compare runs: {tracking_hint}",
    ]
    return "\n".join(lines)


def best_lines(study: optuna.Study, spec: Spec) -> list[str]:
    """The best trial, or each trial of the Pareto front: values, parameters, MLflow run, retrain command."""
    trials = best_trials(study, spec)
    if not trials:
        return ["No trial has completed yet."]
    lines = [f"Pareto front ({len(trials)} trials):" if spec.multi_objective else "Best trial:"]
    for trial in trials:
        lines += [
            f"  trial {trial.number}: {values_text(spec, trial)}",
            "    " + "  ".join(f"{k}={_short(v)}" for k, v in trial.params.items()),
            f"    MLflow run {trial.user_attrs.get('mlflow_run_id', 'unknown')}",
            f"    retrain: {retrain_command(trial, spec)}",
        ]
    return lines


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def duration(seconds: float) -> str:
    """`42s`, `4m10s`, `2h05m`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
