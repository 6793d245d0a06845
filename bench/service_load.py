"""The load one study worker puts on its services, measured: Optuna storage transactions and MLflow requests.

    python bench/service_load.py [--trials 4] [--epochs 2 4]

Runs the same small study (one worker by default, `hydra/launcher=local_gpu`, the median pruner, which is asked every
epoch but never prunes here) on a throwaway PostgreSQL database and a real `mlflow server`, once for each epoch
count, and counts:

- PostgreSQL transactions on the study's database (`pg_stat_database.xact_commit + xact_rollback`): every
  Optuna storage call is one (ask, report, should_prune, heartbeat, tell...);
- the tracking server's HTTP requests, by endpoint (its access log).

The difference between the two epoch counts gives the cost of one epoch; the rest, per trial, the fixed
cost. Heartbeats come every `study.heartbeat_interval` seconds on top (one transaction each). Needs
PostgreSQL as the tests do (127.0.0.1:5432, trust; or WORKBENCH_TEST_POSTGRES).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' throwaway database and tracking server

from helpers import POSTGRES, cli_env, cluster_study, serve_mlflow, throwaway_database  # noqa: E402

REQUEST = re.compile(r'"(GET|POST|PATCH|DELETE) (/api/[^ ?]+|/ajax-api/[^ ?]+)')


def transactions(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_force_next_flush()")
        row = connection.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


class Connections(threading.Thread):
    """The most connections to the study's database seen at once, polled from the server's admin database
    (so the polling itself is no transaction of the study's)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.database = url.rsplit("/", 1)[1].split("?")[0]
        self.most, self.done = 0, threading.Event()

    def run(self) -> None:
        import psycopg

        with psycopg.connect(POSTGRES, autocommit=True) as connection:
            while not self.done.wait(0.1):
                row = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.database,)
                ).fetchone()
                self.most = max(self.most, int(row[0]) if row else 0)


def measure(trials: int, epochs: int, workers: int, folder: Path) -> tuple[int, collections.Counter[str], int]:
    """(storage transactions, tracking requests by endpoint, most storage connections at once) of one
    study of `trials` x `epochs`."""
    with serve_mlflow(folder / "server") as server, throwaway_database() as storage:
        log = folder / "server" / "server.log"
        requests_before = len(log.read_text().splitlines())
        args = cluster_study(
            storage,
            server.url,
            f"study.n_trials={trials}",
            f"trainer.epochs={epochs}",
            "study.pruner.name=median",
            "+study.pruner.n_startup_trials=1000",  # reports and asks every epoch, never prunes
            "study.heartbeat_interval=3600",  # counted apart: one transaction every interval
            workers=workers,
            launcher="local_gpu",
        )
        connections = Connections(storage)
        connections.start()
        result = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), *args], cwd=folder, env=cli_env(), capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SystemExit(f"the study failed:\n{(result.stdout + result.stderr)[-3000:]}")
        connections.done.set()
        connections.join()
        total = transactions(storage)
        lines = log.read_text().splitlines()[requests_before:]
        counts = collections.Counter(m.group(2) for line in lines if (m := REQUEST.search(line)))
        return total, counts, connections.most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, nargs=2, default=(2, 4))
    parser.add_argument("--workers", type=int, default=1, help="study workers (hydra/launcher=local_gpu)")
    args = parser.parse_args()
    results = {}
    for epochs in args.epochs:
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "server").mkdir()
            results[epochs] = measure(args.trials, epochs, args.workers, Path(folder))
        storage, requests, most = results[epochs]
        print(
            f"{args.trials} trials x {epochs} epochs: {storage} storage transactions, {sum(requests.values())} "
            f"tracking requests, at most {most} storage connections at once"
        )
        for endpoint, count in requests.most_common():
            print(f"    {count:>5}  {endpoint}")
    (low, (s_low, r_low, _)), (high, (s_high, r_high, _)) = sorted(results.items())
    per_epoch_storage = (s_high - s_low) / (args.trials * (high - low))
    per_epoch_requests = (sum(r_high.values()) - sum(r_low.values())) / (args.trials * (high - low))
    print(f"\nper epoch of a trial: {per_epoch_storage:.1f} storage transactions, {per_epoch_requests:.1f} requests")
    fixed_storage = s_low / args.trials - per_epoch_storage * low
    fixed_requests = sum(r_low.values()) / args.trials - per_epoch_requests * low
    print(
        f"per trial besides:    {fixed_storage:.1f} storage transactions, {fixed_requests:.1f} requests "
        "(the study's own creation and parent run included, spread over its trials)"
    )
    print("plus one storage transaction per heartbeat (study.heartbeat_interval) of each running trial")


if __name__ == "__main__":
    main()
