"""Which pruner would have paid? Replays the epoch curves of a study run without pruning through candidate
pruners, in a second, to shortlist one before bench/pruning.py measures it for real.

    .venv/bin/python bench/pruning_replay.py sqlite:///optuna.db [--study NAME] \\
        [--pruner 'successive_halving min_resource=1 reduction_factor=4' ...]

Each complete trial of the study is fed, in the order it ran, to a fresh in-memory study with the candidate
pruner: it reports its recorded epochs until the pruner stops it (never at the last epoch, as the workbench's
trials). Printed per candidate: the share of the epochs it would have trained and the best value it would
have kept. An approximation: in a real pruned study the sampler learns from pruned trials and suggests other
parameters, so confirm the choice with bench/pruning.py.
"""

from __future__ import annotations

import argparse

import optuna
from optuna.trial import FrozenTrial, TrialState

from workbench.study.samplers import PRUNER_CLASSES

# What docs/studies.md compares: successive halving and hyperband over their main knobs, median and percentile
# over their warm-up. Hyperband's max_resource comes from the curves.
CANDIDATES = [
    *(f"successive_halving min_resource={m} reduction_factor={r}" for m in (1, 2, 3) for r in (2, 3, 4)),
    *(f"hyperband min_resource={m} reduction_factor={r}" for m in (1, 2) for r in (3, 4)),
    *(f"median n_startup_trials=3 n_warmup_steps={w}" for w in (1, 2, 3)),
    *(f"percentile percentile=25.0 n_startup_trials=3 n_warmup_steps={w}" for w in (1, 2, 3)),
]


def build(spec: str, epochs: int) -> optuna.pruners.BasePruner:
    name, *options = spec.split()
    kwargs = {key: float(value) if "." in value else int(value) for key, value in (o.split("=") for o in options)}
    if name == "hyperband":
        kwargs.setdefault("max_resource", epochs)
    return getattr(optuna.pruners, PRUNER_CLASSES[name])(**kwargs)


def replay(trials: list[FrozenTrial], direction: str, pruner: optuna.pruners.BasePruner) -> tuple[int, float]:
    """Epochs the pruner would have let the trials train, and the best value among those it let finish."""
    study = optuna.create_study(direction=direction, pruner=pruner)
    epochs = 0
    for recorded in trials:
        trial = study.ask()
        steps = sorted(recorded.intermediate_values)
        for step in steps:
            trial.report(recorded.intermediate_values[step], step)
            epochs += 1
            if step < steps[-1] and trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, recorded.value)
    return epochs, study.best_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("storage", help="the Optuna storage of a study run with study.pruner.name=none")
    parser.add_argument("--study", help="its name (default: the storage's only study)")
    parser.add_argument("--pruner", action="append", help="'<name> key=value ...' (default: docs' candidates)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = args.study or optuna.get_all_study_names(args.storage)[0]
    study = optuna.load_study(study_name=name, storage=args.storage)
    trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
    total = sum(len(t.intermediate_values) for t in trials)
    epochs = max(len(t.intermediate_values) for t in trials)
    direction = study.direction.name.lower()
    print(f"{name}: {len(trials)} complete trials, {total} epochs, best {study.best_value:.4f}")
    for spec in args.pruner or CANDIDATES:
        used, best = replay(trials, direction, build(spec, epochs))
        print(f"  {spec:<64} epochs {used / total:5.0%}  best {best:.4f}  gap {abs(study.best_value - best):.4f}")


if __name__ == "__main__":
    main()
