"""Train a Keras image classifier composed by Hydra, tracked in MLflow.

python run.py                                        # small_cnn on the built-in digits
python run.py model=nasnet_large optimizer=momentum  # any group option, any key: group.key=value
python run.py recipe=resnet50_imagenet data=image_folder data.path=~/images
python run.py --multirun model=resnet50,inception_v3 # a sweep; studies come with study=<name>
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from workbench.app import fail
from workbench.config import ConfigError
from workbench.precheck import check_command_line

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from workbench.app import main as run

    return run(cfg)


if __name__ == "__main__":
    # Before Hydra: --help and refusals answer at once, and a refused command leaves no outputs/ folder.
    try:
        check_command_line(sys.argv[1:], CONF)
    except ConfigError as exc:
        fail(str(exc))
    main()
