"""`python run.py --help` lists the app's groups and options from conf/ and writes nothing; --hydra-help
stays Hydra's; bench/startup.py runs. (Refusals and their imports: test_bad_input.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import CONF, ROOT, cli_env, run_cli


def conf_groups() -> dict[str, list[str]]:
    """Each folder of conf/ (Hydra's own excluded) and the options it holds, read here independently."""
    return {
        folder.name: sorted(p.stem for p in folder.glob("*.yaml"))
        for folder in sorted(CONF.iterdir())
        if folder.is_dir() and folder.name != "hydra"
    }


def test_help_lists_every_group_and_its_options(workdir: Path) -> None:
    result = run_cli(["--help"], cwd=workdir, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    groups = conf_groups()
    assert {"model", "optimizer", "schedule", "augmentation", "data", "trainer", "tracking", "recipe", "study"} <= set(
        groups
    )
    for group, options in groups.items():
        assert f"{group}: {', '.join(options)}" in lines, f"--help misses {group}: {', '.join(options)}"
    assert not [line for line in lines if line.startswith("hydra/")], "Hydra's own groups belong to --hydra-help"
    assert "  learning_rate: 0.001" in lines  # the composed config, as Hydra's --help shows it
    assert result.stderr == ""
    assert list(workdir.iterdir()) == [], "--help wrote files"


def test_help_shows_the_config_the_overrides_compose(workdir: Path) -> None:
    result = run_cli(["optimizer=momentum", "optimizer.learning_rate=0.05", "--help"], cwd=workdir, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "  name: momentum" in result.stdout.splitlines()
    assert "  learning_rate: 0.05" in result.stdout.splitlines()


def test_hydra_help_is_hydras(workdir: Path) -> None:
    result = run_cli(["--hydra-help"], cwd=workdir, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "hydra/launcher:" in result.stdout and "joblib" in result.stdout


def test_startup_benchmark_runs(tmp_path: Path) -> None:
    # One repetition: the benchmark's own checks (exit statuses) are what is tested, not its timings.
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "startup.py"), "--repeat", "1"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(" s  python run.py " in line for line in lines), result.stdout
    assert "left behind" not in result.stdout
