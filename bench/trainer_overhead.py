"""How much the workbench trainer costs over a bare `model.fit` on the same model and data.

    python bench/trainer_overhead.py [key=value ...]     # e.g. model.input_size=64 trainer.epochs=6

Both sides train the same architecture on the same tf.data pipeline, in one process, alternating, and
the report compares median epoch-end to epoch-end times (the first epoch, which traces, is left out) as a
ratio, so a noisy machine moves both sides alike.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


def main(overrides: list[str]) -> None:
    import keras

    from workbench import data, models, optim, sources
    from workbench.train import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["trainer.epochs=6", "tracking.log_model=false", *overrides])
    size = models.input_size(cfg.model)
    source = sources.load(cfg.data, size)

    def bare() -> list[float]:
        keras.backend.clear_session()
        pipes = data.build(source, cfg, size, models.preprocessor(cfg.model.name))
        model = models.build(cfg.model, source.num_classes)
        model.compile(
            optimizer=optim.build_optimizer(cfg.optimizer, cfg.schedule, pipes.steps_per_epoch, cfg.trainer.epochs),
            loss=keras.losses.CategoricalCrossentropy(),
            metrics=["accuracy", keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy")],
            jit_compile="auto" if str(cfg.model.jit_compile) == "auto" else bool(cfg.model.jit_compile),
        )
        ends: list[float] = []
        timer = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append(time.perf_counter()))
        model.fit(
            pipes.train,
            epochs=cfg.trainer.epochs,
            steps_per_epoch=pipes.steps_per_epoch,
            validation_data=pipes.val,
            callbacks=[timer],
            verbose=0,
            shuffle=False,
        )
        return _gaps(ends)

    def workbench() -> list[float]:
        # The report hook runs mid-way through the epoch-end callbacks (after the metrics, before the checkpoint
        # and MLflow). Each gap between two reports is still one whole epoch with every callback once: the
        # previous epoch's checkpoint and MLflow logging, then this epoch's training, validation and metrics.
        ends: list[float] = []
        train(cfg, report=lambda epoch, metrics: ends.append(time.perf_counter()))
        return _gaps(ends)

    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.chdir(tmp)
        rounds = {"bare": [], "workbench": []}
        for _ in range(2):
            rounds["bare"] += bare()
            rounds["workbench"] += workbench()
    b, w = statistics.median(rounds["bare"]), statistics.median(rounds["workbench"])
    print(f"model={cfg.model.name} input={size} batch={cfg.trainer.batch_size} epochs={cfg.trainer.epochs}")
    print(f"bare model.fit   median epoch {b:.3f} s")
    print(f"workbench.train  median epoch {w:.3f} s")
    print(f"ratio workbench/bare = {w / b:.3f}")


def _gaps(ends: list[float]) -> list[float]:
    """From one epoch's timestamp to the next: whole epochs after the first, each callback counted once."""
    return [b - a for a, b in itertools.pairwise(ends)]


if __name__ == "__main__":
    main(sys.argv[1:])
