"""Clean stops: a signal ends a run or a study in one line with exit status 128 + signal, every trial and
run in a final state; a local worker that died is seen dead at once. Real processes, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import ROOT, SMALL, STUDY, TINY, cli_env, load_study, tracking_uri, trials_so_far
from workbench import signals

DEADLINE_S = 240  # for anything to happen on a busy 2-core machine


# --- the mechanism, in this process ------------------------------------------------------------------


def test_a_signal_raises_once_recorded_and_nested_scopes_keep_one_handler() -> None:
    # signal.raise_signal runs the Python handler before it returns.
    before = signal.getsignal(signal.SIGTERM)
    with signals.stop_on_signals():
        installed = signal.getsignal(signal.SIGTERM)
        with signals.stop_on_signals():  # as tracking.run inside a study worker
            assert signal.getsignal(signal.SIGTERM) is installed
            with pytest.raises(signals.Terminated):
                signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)  # ignored: the stop's clean-up must not be cut short
        assert signal.getsignal(signal.SIGTERM) is installed  # the inner scope left the outer one's
        assert signals.received() == signal.SIGTERM and signals.exit_status() == 143
        with pytest.raises(signals.Terminated):
            signals.check()  # raised again: its first exception may have been swallowed
    assert signal.getsignal(signal.SIGTERM) is before
    with signals.stop_on_signals():  # a new outermost scope starts afresh
        assert signals.received() is None
        with pytest.raises(KeyboardInterrupt) as stop:
            signal.raise_signal(signal.SIGINT)
        assert not isinstance(stop.value, signals.Terminated) and signals.exit_status() == 130


def test_a_deferred_scope_records_the_first_signal_and_raises_on_the_second(capsys) -> None:
    with signals.stop_on_signals(defer=True):
        signal.raise_signal(signal.SIGUSR2)
        assert signals.received() == signal.SIGUSR2 and signals.exit_status() == 140
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert "Ctrl-C again" in capsys.readouterr().err


# --- a run -------------------------------------------------------------------------------------------


# SIGTERM: a scheduler's stop or preemption; SIGUSR2: SLURM's warning before the time limit (slurm_gpu).
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_a_stop_signal_ends_a_run_killed_in_one_line_with_how_to_continue(workdir: Path, sig: signal.Signals) -> None:
    args = [*TINY, "trainer.epochs=60", "tracking.log_model=false", "optimizer.learning_rate=0.002"]
    process = _start(["run.py", *args], workdir)
    _wait_for(lambda: list(workdir.glob("checkpoints/*/state.json")), "the first epoch checkpoint", process)
    process.send_signal(sig)
    output = _finish(process)
    assert process.returncode == 128 + sig, output[-3000:]
    assert "Traceback" not in output and "Terminated" not in output, output[-3000:]
    (line,) = [line for line in output.splitlines() if line.startswith("stopped by")]
    found = re.fullmatch(rf"stopped by {sig.name} after epoch (\d+) of 60; continue with: python run\.py (.*)", line)
    assert found, line
    assert found[2] == " ".join([*args, "trainer.resume=true"])
    (state,) = workdir.glob("checkpoints/*/state.json")
    assert int(found[1]) == json.loads(state.read_text())["epoch"] >= 1
    (run,) = MlflowClient(tracking_uri(workdir)).search_runs(_experiments(workdir))
    assert run.info.status == "KILLED" and run.data.tags["workbench.stopped"] == f"interrupted ({sig.name})"
    # The epoch checkpoint is whole: it loads.
    import keras

    (last,) = workdir.glob("checkpoints/*/last.keras")
    assert keras.saving.load_model(last).name == "small_cnn"


# --- a study -----------------------------------------------------------------------------------------


def test_ctrl_c_stops_parallel_workers_cleanly(workdir: Path) -> None:
    """Ctrl-C in a terminal signals the whole process group: the launcher and each joblib worker."""
    args = [
        f"study={STUDY}",
        "study.n_trials=2",
        "study.workers=2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "trainer.epochs=400",
        "study.pruner.name=none",
        *SMALL,
    ]
    process = _start(["run.py", "--multirun", *args], workdir, start_new_session=True)

    def both_training() -> bool:
        trials = trials_so_far(workdir)
        return len(trials) == 2 and all(t.state == TrialState.RUNNING and t.intermediate_values for t in trials)

    _wait_for(both_training, "both workers' trials to report an epoch", process)
    os.killpg(process.pid, signal.SIGINT)
    output = _finish(process)
    assert process.returncode == 130, output[-3000:]
    assert "Exception ignored" not in output and "Traceback" not in output, output[-3000:]
    _wait_for(lambda: not _group_alive(process.pid), "the joblib workers to exit")

    study = load_study(workdir)
    trials = study.get_trials()
    assert TrialState.RUNNING not in [t.state for t in trials]
    interrupted = [t for t in trials if t.number in (0, 1)]
    assert [t.state for t in interrupted] == [TrialState.FAIL] * 2
    # Each goes back to the study as a retry, which the next launch runs from its epoch checkpoint.
    assert sorted(t.system_attrs.get("failed_trial") for t in trials if t.state == TrialState.WAITING) == [0, 1]
    client = MlflowClient(tracking_uri(workdir))
    for trial in interrupted:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert (run.info.status, run.data.tags["state"]) == ("KILLED", "FAIL")
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"


# --- helpers -----------------------------------------------------------------------------------------


def _start(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    with open(cwd / "output.txt", "w") as output:
        return subprocess.Popen(
            [sys.executable, str(ROOT / args[0]), *args[1:]],
            cwd=cwd,
            env=cli_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            **popen,
        )


def _finish(process: subprocess.Popen) -> str:
    """Wait for the process (with a deadline); its stdout and stderr together."""
    process.wait(timeout=DEADLINE_S)
    return _output()


def _output() -> str:
    return Path("output.txt").read_text()  # in the test's workdir, the current folder


def _wait_for(condition: Callable[[], object], what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before {what}: {_output()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _experiments(cwd: Path) -> list[str]:
    return [e.experiment_id for e in MlflowClient(tracking_uri(cwd)).search_experiments()]


def test_a_stop_during_a_held_write_is_raised_once_the_write_is_done() -> None:
    # What the epoch-end writes (checkpoint, metrics, the study report) rely on: never cut in half.
    written = []
    with signals.stop_on_signals(), pytest.raises(signals.Terminated):
        with signals.held():
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at once, between two bytecodes
            written.append("first half")
            written.append("second half")
        written.append("after the write")
    assert written == ["first half", "second half"]
    assert signals.received() == signal.SIGTERM
