"""Experiment-tracking hyper-parameter tuning workbench for TensorFlow/Keras image classifiers.

`workbench.train(cfg)` is the one trainer behind `python run.py` and every study trial. Importing the
package does not import TensorFlow; training does.
"""

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the console
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded file otherwise

from workbench.config import ConfigError, validate

if TYPE_CHECKING:
    from workbench.train import Result

__all__ = ["ConfigError", "train", "validate"]


def __getattr__(name: str) -> Callable[..., "Result"]:
    # `train` pulls in the trainer lazily, so configuration and the CLI stay fast.
    if name == "train":
        from workbench.train import train

        return train
    raise AttributeError(name)
