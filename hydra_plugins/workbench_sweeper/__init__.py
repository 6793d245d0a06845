"""The workbench's Optuna sweeper for Hydra: `python run.py --multirun study=<name>` (docs/studies.md)."""
