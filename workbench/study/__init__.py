"""Optuna studies over the shared trainer (docs/studies.md).

spec (the study block) and space (the search space) -> preflight (what is refused before any trial) ->
storage (Optuna storage, budget lock) -> worker (the trial loop) -> trial (one trial through the trainer);
parent, progress and report (MLflow parent run, progress line, plots and best config) serve the sweeper;
keep (the artifact policy) and registry (the winner as a registered model's champion) serve it and the CLI.
"""
