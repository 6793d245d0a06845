"""A study under Optuna's own concurrency test, through the workbench: many workers, one PostgreSQL storage.

    .venv/bin/python bench/study_concurrency.py [--workers 8 --trials-per-worker 20] [key=value ...]

Optuna's storage tests run 8 processes x 20 trials on one study (`test_multiprocess_run_optimize`) and
check that exactly 160 trials exist with distinct numbers. This does the same through the workbench's own
launcher, with the smallest trials it allows (1 epoch of 1 step, 1 validation step, 16 px digits, no model
logging, no checkpoints, no pruner), so that the services, not training, are what the workers contend for:

    python run.py --multirun study=lr_batch_decay_dropout study.n_trials=160 study.workers=8 \\
        hydra/launcher=local_gpu hydra.launcher.gpus_per_node=0 study.storage=postgresql://... \\
        tracking.uri=http://127.0.0.1:<port> ...

on a throwaway PostgreSQL database and a real `mlflow server` (PostgreSQL backend in a database of its own,
artifacts in the temp folder), both from tests/helpers.py, in a temp working folder; all three go away
afterwards, whatever happens. Heartbeats come every second (as the cluster tests beat), with a 60 s grace
period so that a late heartbeat on a loaded machine is not taken for a dead worker. `key=value` arguments
go last on the command line (e.g. `study.heartbeat_interval=60`).

It checks, and exits 1 if any check fails:

- the Optuna storage holds exactly workers x trials-per-worker trials, numbered 0..N-1, all COMPLETE
  (none RUNNING or WAITING);
- MLflow holds as many child runs (tag `trial_number`), with distinct trial numbers, all FINISHED, all
  children of the one parent run the study records, and that parent is FINISHED;

and prints the wall time of the whole command (start-up of the launching process and the TensorFlow workers,
the study's report), trials per minute over it and over the trials alone (first start to last end), the
trials each worker ran, and the most connections to the study's database seen at once (`pg_stat_activity`,
sampled every 0.1 s from the admin database by bench/service_load.py's poller). Needs PostgreSQL as the
tests do (127.0.0.1:5432, trust; or WORKBENCH_TEST_POSTGRES).

Measured on 2026-11-29 on a 2-core machine with 24 GiB and no GPU, 8 workers x 20 trials: all checks
passed (160 COMPLETE trials numbered 0..159, 160 FINISHED child runs of the one FINISHED parent run, no
error in the workers' logs); wall time 678 s (11.3 min), 14.2 trials/min over the whole command and
14.7 trials/min from the first trial's start to the last one's end (653 s); 19 to 21 trials a worker; at
most 23 connections to the study's database at once (one of them may have been a single look at the
study from outside during the run), as docs/cluster.md's 2.5 a worker and 2 for the launching process
predict. Another session's cluster tests shared the two cores for the second half of the run (load
average up to 14): alone, the first 4 minutes ran about 17 trials/min. Each worker held about 0.95 GB.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' throwaway database and tracking server

from service_load import Connections  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from helpers import STUDY, cli_env, cluster_study, serve_mlflow, throwaway_database  # noqa: E402

# The smallest trial the workbench allows; after cluster_study's own settings, so these win.
SMALLEST = [
    "trainer.epochs=1",
    "trainer.steps_per_epoch=1",
    "trainer.validation_steps=1",
    "model.input_size=16",
    "tracking.log_model=false",
    "tracking.checkpoints=none",
    "hydra.launcher.gpus_per_node=0",  # no GPU here: every job gets CUDA_VISIBLE_DEVICES="" and all start at once
    "study.grace_period=60",
]


def run_study(args: list[str], folder: Path, timeout: float) -> tuple[int, float, str, bool]:
    """(exit status, wall seconds, console output, whether workers outlived it) of `python run.py <args>` in
    `folder`. The command runs in a session of its own, so that a timeout or an interrupt here ends it and its
    workers, and nothing else."""
    log = folder / "study.log"
    with log.open("w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *args],
            cwd=folder,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(process)
            status = -1
        except BaseException:  # Ctrl-C here
            stop(process)
            raise
        wall = time.perf_counter() - start
        stragglers = left_behind(process)
        if stragglers:
            stop(process)
    return status, wall, log.read_text(errors="replace"), stragglers


def stop(process: subprocess.Popen) -> None:
    """End the study command and its workers: SIGINT first, so that the workers hand back their trials, then
    SIGKILL to whatever of its session is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def left_behind(process: subprocess.Popen) -> bool:
    """Whether processes of the study command's session (its workers) outlived it."""
    try:
        os.killpg(process.pid, 0)
        return True
    except ProcessLookupError:
        return False


def check_storage(url: str, expected: int) -> tuple[list[str], list[str], str | None]:
    """(report lines, failed checks, the study's MLflow parent run) of the trials in the Optuna storage."""
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        study = optuna.load_study(study_name=STUDY, storage=storage)
        trials = study.get_trials(deepcopy=False)
        parent = study.user_attrs.get("mlflow_parent_run_id")
    finally:
        storage.engine.dispose()
    states = collections.Counter(t.state.name for t in trials)
    numbers = collections.Counter(t.number for t in trials)
    workers = collections.Counter(t.user_attrs.get("worker", {}).get("pid") for t in trials)
    lines = [
        f"Optuna storage: {len(trials)} trials, {len(numbers)} distinct numbers, {dict(states)}",
        f"  trials per worker process: {sorted(workers.values(), reverse=True)}",
    ]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if starts and ends:
        span = (max(ends) - min(starts)).total_seconds()
        lines.append(f"  first trial start to last trial end: {span:.0f} s, {len(ends) / span * 60:.1f} trials/min")
    failed = []
    if len(trials) != expected:
        failed.append(f"{len(trials)} trials in the storage, expected {expected}")
    if sorted(numbers) != list(range(expected)) or len(numbers) != len(trials):
        duplicated = sorted(n for n, c in numbers.items() if c > 1)
        missing = sorted(set(range(expected)) - set(numbers))
        failed.append(f"trial numbers are not 0..{expected - 1} once each: duplicated {duplicated}, missing {missing}")
    left = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    if left:
        failed.append(f"trials left RUNNING or WAITING: {left}")
    if states["COMPLETE"] != expected:
        failed.append(f"{states['COMPLETE']} COMPLETE trials, expected {expected}: {dict(states)}")
    if parent is None:
        failed.append("the study records no mlflow_parent_run_id")
    return lines, failed, parent


def check_tracking(server: str, parent_id: str | None, expected: int) -> tuple[list[str], list[str]]:
    """(report lines, failed checks) of the study's parent and child runs on the tracking server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while True:
        page = client.search_runs(experiments, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    children = [r for r in runs if "trial_number" in r.data.tags]
    numbers = collections.Counter(r.data.tags["trial_number"] for r in children)
    parents = collections.Counter(r.data.tags.get("mlflow.parentRunId") for r in children)
    statuses = collections.Counter(r.info.status for r in children)
    parent_status = client.get_run(parent_id).info.status if parent_id else None
    lines = [
        f"MLflow: {len(runs)} runs; {len(children)} child runs {dict(statuses)}, {len(numbers)} distinct trial "
        f"numbers, pointing at {len(parents)} parent run(s)",
        f"  the study's parent run {parent_id}: {parent_status}",
    ]
    if children:  # what a trial trained: the command line's last values win
        params = children[0].data.params
        keys = ("trainer.epochs", "trainer.steps_per_epoch", "trainer.validation_steps", "model.input_size")
        lines.append("  a trial's " + ", ".join(f"{k}={params.get(k)}" for k in keys))
    failed = []
    if len(children) != expected:
        failed.append(f"{len(children)} child runs, expected {expected}")
    if sorted(numbers) != sorted(str(n) for n in range(expected)) or len(numbers) != len(children):
        odd = {n: c for n, c in numbers.items() if c > 1}
        missing = sorted(set(range(expected)) - {int(n) for n in numbers})
        failed.append(f"child runs' trial numbers are not 0..{expected - 1} once each: twice {odd}, missing {missing}")
    if list(parents) != [parent_id]:
        failed.append(f"child runs point at {dict(parents)}, expected only the study's parent {parent_id}")
    if statuses["FINISHED"] != len(children):
        failed.append(f"child runs not all FINISHED: {dict(statuses)}")
    if parent_status != "FINISHED":
        failed.append(f"the parent run is {parent_status}, expected FINISHED")
    return lines, failed


def worker_problems(folder: Path) -> list[str]:
    """Tracebacks and errors in the workers' logs (multirun/.../.submitit/), the first few of each kind."""
    found: collections.Counter[str] = collections.Counter()
    for path in folder.glob("multirun/*/*/.submitit/*/*"):
        if path.suffix in (".out", ".err"):
            for line in path.read_text(errors="replace").splitlines():
                noise = "cuInit" in line  # TensorFlow looking for a GPU where there is none
                if not noise and ("Traceback" in line or " ERROR " in line or "Error:" in line):
                    found[line.strip()[:200]] += 1
    return [f"{count:>5} x {line}" for line, count in found.most_common(10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials-per-worker", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the study is stopped")
    parser.add_argument("overrides", nargs="*", help="more run.py overrides, last on the command line")
    args = parser.parse_args()
    n_trials = args.workers * args.trials_per_worker
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "server").mkdir()
        (folder / "work").mkdir()
        with serve_mlflow(folder / "server") as server, throwaway_database() as storage:
            command = cluster_study(
                storage,
                server.url,
                f"study.n_trials={n_trials}",
                *SMALLEST,
                *args.overrides,
                workers=args.workers,
                launcher="local_gpu",
            )
            print(f"{args.workers} workers x {args.trials_per_worker} trials: python run.py {' '.join(command)}")
            connections = Connections(storage)
            connections.start()
            try:
                status, wall, output, stragglers = run_study(command, folder / "work", args.timeout)
            finally:
                connections.done.set()
                connections.join()
            print(
                f"exit status {status}, wall time {wall:.0f} s ({wall / 60:.1f} min), {n_trials / wall * 60:.1f} "
                f"trials/min; at most {connections.most} connections to the study's database at once"
            )
            if status != 0:
                failed.append(f"run.py exited with status {status}" + (" (timed out)" if status == -1 else ""))
                print(f"--- the last of its output ---\n{output[-4000:]}\n---")
            if stragglers:
                failed.append("processes of the study (workers) were still running after run.py exited")
            parent = None
            try:
                lines, problems, parent = check_storage(storage, n_trials)
                print("\n".join(lines))
                failed += problems
            except Exception as exc:  # no study at all, say
                failed.append(f"could not read the study: {exc!r}")
            try:
                lines, problems = check_tracking(server.url, parent, n_trials)
                print("\n".join(lines))
                failed += problems
            except Exception as exc:
                failed.append(f"could not read the runs: {exc!r}")
            problems = worker_problems(folder / "work")
            if problems:
                print("errors in the workers' logs:\n" + "\n".join(problems))
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed))
        raise SystemExit(1)
    print(f"all checks passed: {n_trials} trials, {n_trials} FINISHED child runs of one FINISHED parent run")


if __name__ == "__main__":
    main()
