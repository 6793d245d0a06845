"""Registers `hydra/sweeper=workbench` and the study schema with Hydra's ConfigStore.

Why not hydra-optuna-sweeper, the plugin a Hydra user reaches for first: it pins optuna<3; it cannot
prune, because the trial never reaches the job (hydra#1954); it launches whole batches and waits for the
slowest job of each, so GPUs sit idle (hydra#3091); and it runs n_trials again on every resume
(hydra#1407). This sweeper launches `study.workers` jobs once; each asks the shared study for trials
until the study's budget is spent, with the trial inside the job so it can prune.
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from workbench.study.spec import StudyConf


@dataclass
class WorkbenchSweeperConf:
    # Everything else lives in the config's `study:` block, which the worker jobs read too.
    _target_: str = "hydra_plugins.workbench_sweeper.workbench_sweeper.WorkbenchSweeper"


store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="workbench", node=WorkbenchSweeperConf, provider="workbench")
# Study files start from it: `defaults: [/study_schema@study, ...]`.
store.store(name="study_schema", node=StudyConf, provider="workbench")
