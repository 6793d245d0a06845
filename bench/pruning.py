"""Does a study's pruner pay? The study run with its pruner, without, and with any other pruner given, on
the same sampler seeds, side by side.

    .venv/bin/python bench/pruning.py [--study lr_batch_decay_dropout] [--seeds 0 1] [--trials 30] \\
        [--pruner 'study.pruner.name=median +study.pruner.n_warmup_steps=4'] [--jobs 2] [key=value ...]

Each study runs as a user would run it (`python run.py --multirun study=<name> study.sampler.seed=<s>
study.n_trials=<n> [study.pruner.name=none] [key=value ...]`) in a temp folder of its own, one after
another (one worker, so the machine's cores go to one trial at a time and timings are comparable; `--jobs N`
runs N studies at once, which changes their minutes, not their epochs or best values). Per
study it prints the best value, the epochs trained (every epoch each trial reported, pruned ones included)
and the trials pruned; then, per pruner, the medians over seeds of the pruned-to-unpruned epochs ratio and
of the best-value gap, ending with one line for the study's own pruner:

    epochs_ratio=<pruned/unpruned> best_delta=<unpruned best - pruned best>

`key=value` arguments go to every study (e.g. trainer.epochs=12); `--keep DIR` keeps each study's stores.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
OWN = "its own pruner"
NONE = "study.pruner.name=none"


@dataclass(frozen=True)
class Outcome:
    best: float
    epochs: int
    pruned: int
    trials: int
    seconds: float


def run_study(study: str, seed: int, trials: int, pruner: str | None, extra: list[str], folder: Path) -> Outcome:
    storage = f"sqlite:///{folder / 'optuna.db'}"
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        "--multirun",
        f"study={study}",
        f"study.sampler.seed={seed}",
        f"study.n_trials={trials}",
        f"study.storage={storage}",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
        *([pruner] if pruner else []),
        *extra,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    (summary,) = optuna.get_all_study_summaries(storage)
    found = optuna.load_study(study_name=summary.study_name, storage=storage)
    done = [t for t in found.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    return Outcome(
        best=found.best_value,
        epochs=sum(len(t.intermediate_values) for t in done),
        pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in done),
        trials=len(done),
        seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="lr_batch_decay_dropout")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--pruner", action="append", default=[], help="an override that sets another pruner")
    parser.add_argument("--jobs", type=int, default=1, help="studies run at once (default 1)")
    parser.add_argument("--keep", type=Path, help="keep each study's folder (optuna.db, mlflow.db) under this one")
    args, extra = parser.parse_known_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruners = {OWN: None, **{p: p for p in args.pruner}}
    outcomes: dict[str, list[Outcome]] = {name: [] for name in [NONE, *pruners]}
    runs = [(seed, name, override) for seed in args.seeds for name, override in [(NONE, NONE), *pruners.items()]]

    def one(seed: int, name: str, override: str | None) -> Outcome:
        folder = Path(tempfile.mkdtemp(prefix=f"pruning-seed{seed}-", dir=args.keep))
        outcome = run_study(args.study, seed, args.trials, override, extra, folder)
        if args.keep is None:
            shutil.rmtree(folder)
        return outcome

    print(f"{'pruner':<50} seed   best  epochs  pruned  minutes")
    with ThreadPoolExecutor(args.jobs) as pool:  # each study is a process of its own: threads only wait
        futures = [pool.submit(one, *run) for run in runs]
        for (seed, name, _), future in zip(runs, futures, strict=True):
            outcome = future.result()
            outcomes[name].append(outcome)
            print(
                f"{name:<50} {seed:>4} {outcome.best:.4f} {outcome.epochs:>7} {outcome.pruned:>7} "
                f"{outcome.seconds / 60:>8.1f}",
                flush=True,
            )
    print()
    lines = {}
    for name in pruners:
        pairs = list(zip(outcomes[NONE], outcomes[name], strict=True))
        ratio = statistics.median(p.epochs / u.epochs for u, p in pairs)
        delta = statistics.median(u.best - p.best for u, p in pairs)
        lines[name] = f"epochs_ratio={ratio:.2f} best_delta={delta:.4f}"
        print(f"{name:<50} {lines[name]}  (medians over {len(pairs)} seeds)")
    print(lines[OWN])


if __name__ == "__main__":
    main()
