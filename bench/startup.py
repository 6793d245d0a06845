"""How fast `python run.py` refuses bad input and answers --help: the median of 5 wall times each.

    python bench/startup.py                    # this checkout
    python bench/startup.py --repeat 9         # more runs per command
    python bench/startup.py --root /tmp/old    # another checkout's run.py (e.g. `git archive` of main), to compare

Each command runs as a fresh subprocess in an empty scratch folder and must exit with the status a user
expects (2 for a refusal, 0 for --help); anything it leaves in that folder is reported. The goal on an
idle 2-core machine is under 1.5 s each: no TensorFlow, Keras, MLflow or Optuna import before a config is
known valid. The CPU seconds (user + system) of each command are printed too: on a busy machine they
move much less than wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    (["optimizer.learning_rate=-1"], 2),  # a bad value
    (["--help"], 0),
    (["optimizer.learnin_rate=0.1"], 2),  # a misspelt key
]


def timed(root: Path, args: list[str], cwd: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall and CPU seconds of one `python run.py <args>`, and its result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(root / "run.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (default 5)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose run.py to time (default: this one)")
    args = parser.parse_args()
    wrong = []
    for command, expected in COMMANDS:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [timed(args.root, command, Path(tmp)) for _ in range(args.repeat)]
            status = runs[-1][2].returncode
            left = sorted(p.name for p in Path(tmp).iterdir())
        wall = statistics.median(w for w, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        note = f"  left behind: {', '.join(left)}" if left else ""
        print(
            f"{wall:6.2f} s  python run.py {' '.join(command)}  "
            f"(median of {args.repeat}; CPU {cpu:.2f} s; exit {status}){note}"
        )
        if status != expected:
            wrong.append(
                f"python run.py {' '.join(command)}: exit {status}, expected {expected}:\n" + runs[-1][2].stderr[-2000:]
            )
    if wrong:
        sys.exit("\n".join(wrong))


if __name__ == "__main__":
    main()
