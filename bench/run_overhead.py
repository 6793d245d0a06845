"""The fixed cost of a run: what the workbench adds around the epochs.

    python bench/run_overhead.py [--pairs 3]

1. Whole process: the default job (`python run.py`: small_cnn on digits, 10 epochs, MLflow tracking, the
   logged model) against a hand-written Keras script that trains the same network on the same digits for
   the same 10 epochs and does nothing else. Each side runs as a fresh process in a fresh folder,
   interleaved pair by pair, and the report gives each pair's ratio and their median: on a noisy machine
   the ratio holds where the seconds do not.
2. A study trial's fixed cost: in one process, as a study worker runs trials, `workbench.train` on a
   6-epoch digits config against the hand-written script's training for the same 6 epochs, interleaved.
   What the workbench adds (MLflow run, params, config, dataset, checkpoints, curves) as a share of the
   trial, 1 - bare / workbench; both build the optimizer before fit, so Keras traces the train step once
   on each side (the plain script of part 1 traces it twice, as most scripts do). A first round, which
   pays TensorFlow's start-up, is left out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BARE = """
import keras, numpy as np, tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

digits = load_digits()
images = np.repeat((digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, axis=-1)
x_train, x_val, y_train, y_val = train_test_split(images, digits.target, test_size=0.2, random_state=0,
                                                  stratify=digits.target)

def dataset(x, y, shuffle):
    ds = tf.data.Dataset.from_tensor_slices((x, tf.one_hot(y, 10)))
    if shuffle:
        ds = ds.shuffle(len(x), seed=0)
    resize = lambda image, label: (tf.image.resize(tf.cast(image, tf.float32), (32, 32)) / 255.0, label)
    return ds.map(resize, num_parallel_calls=tf.data.AUTOTUNE).batch(32, drop_remainder=shuffle).prefetch(2)

def fit(epochs, build_optimizer=False):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = network()
    steps = len(x_train) // 32
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, epochs * steps)),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    if build_optimizer:  # as the workbench does, so that both trace the train step once
        model.optimizer.build(model.trainable_variables)
    model.fit(dataset(x_train, y_train, True), validation_data=dataset(x_val, y_val, False), epochs=epochs,
              verbose=0)

def network():
    layers = keras.layers
    blocks = []
    for i, filters in enumerate((32, 64, 128)):
        blocks += [layers.Conv2D(filters, 3, padding="same", use_bias=False),
                   layers.BatchNormalization(momentum=0.9), layers.ReLU()]
        if i < 2:
            blocks.append(layers.MaxPooling2D())
    return keras.Sequential([keras.Input((32, 32, 3)), *blocks, layers.GlobalAveragePooling2D(),
                             layers.Dropout(0.2), layers.Dense(10), layers.Activation("softmax", dtype="float32")])

if __name__ == "__main__":
    fit(10)
"""


def whole_process(pairs: int) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    commands = {
        "workbench": [sys.executable, str(ROOT / "run.py")],
        "bare keras": [sys.executable, "-c", BARE],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(pairs):
        for name, command in commands.items():
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
    ratios = [w / b for w, b in zip(times["workbench"], times["bare keras"], strict=True)]
    print("1. whole process, default job (10 epochs of digits) against a hand-written Keras script")
    for i, (w, b, r) in enumerate(zip(times["workbench"], times["bare keras"], ratios, strict=True), 1):
        print(f"   pair {i}: workbench {w:6.1f} s  bare keras {b:6.1f} s  ratio {r:.2f}")
    print(f"   median ratio {statistics.median(ratios):.2f}")


def trial_fixed_cost(trials: int) -> None:
    from hydra import compose, initialize_config_dir

    from workbench.train import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["trainer.epochs=6", "tracking.log_model=false", "tracking.checkpoints=none"])
    bare: dict = {}
    exec(BARE, bare)  # the script's data and network, without running it
    shares = []
    print("2. a study trial's fixed cost: workbench.train against the bare fit, 6 epochs, in one process")
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        for trial in range(trials + 1):
            start = time.perf_counter()
            train(cfg)
            workbench = time.perf_counter() - start
            start = time.perf_counter()
            bare["fit"](6, build_optimizer=True)
            plain = time.perf_counter() - start
            if trial:  # the first round pays TensorFlow's start-up
                shares.append(1 - plain / workbench)
                share = f"{shares[-1]:.0%}"
                print(f"   round {trial}: workbench {workbench:5.1f} s  bare keras {plain:5.1f} s  fixed cost {share}")
    print(f"   median fixed cost {statistics.median(shares):.0%} of a 6-epoch digits trial")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="interleaved pairs of whole processes")
    parser.add_argument("--trials", type=int, default=3, help="trials after the first, in one process")
    args = parser.parse_args()
    whole_process(args.pairs)
    trial_fixed_cost(args.trials)


if __name__ == "__main__":
    main()
