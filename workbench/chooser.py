"""The architecture chooser (`workbench models`): what each architecture of the `model` group costs at an
input size, counted from the built Keras model rather than typed in.

- parameters, total and trainable, with the classifier head for `classes`;
- multiply-accumulates per image: conv and dense layers only, as the NASNet, ResNet and Inception papers
  count them (batch norm, activations and pooling are left out);
- weights plus optimizer state: the optimizer of the `optimizer` group, built over the model's variables;
- activations for one training batch: every layer's output kept for the backward pass, in float32 (an
  upper estimate: Keras frees some, and mixed precision halves the rest);
- with `measure`, training images per second on this machine: a few steps on synthetic data after the
  first, compiled one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from workbench.config import ConfigError
from workbench.models import ARCHITECTURES

if TYPE_CHECKING:
    import keras

MEASURED_STEPS = 3  # timed training steps after the compiled first one
_SUFFIXES = {"K": 1e3, "M": 1e6, "G": 1e9}


@dataclass(frozen=True)
class Row:
    name: str
    input_size: int
    native_input_size: int
    min_input_size: int
    parameters: int
    trainable_parameters: int
    gmacs: float  # multiply-accumulates per image, in billions
    weights_and_optimizer_bytes: int
    activation_bytes: int  # one training batch
    images_per_second: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    max_gmacs: float | None = None
    max_params: float | None = None

    def over(self, row: Row) -> str | None:
        """Why the row is over budget, or None."""
        if self.max_gmacs is not None and row.gmacs > self.max_gmacs:
            return f"{row.gmacs:.3g} GMACs > --max-gmacs {self.max_gmacs:g}"
        if self.max_params is not None and row.parameters > self.max_params:
            return f"{millions(row.parameters)} parameters > --max-params {millions(self.max_params)}"
        return None


def names(requested: Iterable[str]) -> list[str]:
    """The architectures to profile: those requested, in order, or every one of the `model` group."""
    requested = list(requested)
    for name in requested:
        if name not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {name!r}; the model group has: {', '.join(ARCHITECTURES)}")
    return requested or list(ARCHITECTURES)


def too_small(name: str, input_size: int | None) -> str | None:
    """Why `name` cannot be built at `input_size`, or None."""
    minimum = ARCHITECTURES[name].min_size
    if input_size is not None and input_size < minimum:
        return f"--input-size {input_size} is below {name}'s minimum of {minimum}"
    return None


def parse_count(option: str, text: str | None) -> float | None:
    """`30M`, `1.5G`, `300K` or a plain number, for --max-params."""
    if text is None:
        return None
    scale = _SUFFIXES.get(text[-1:].upper(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not value > 0:
        raise ConfigError(f"{option} {text}: must be a positive number, optionally with K, M or G (e.g. 30M)")
    return value


def profile(
    name: str, input_size: int | None, classes: int, batch_size: int, optimizer: str, measure: bool, budget: Budget
) -> Row:
    """One architecture's row, timed with `measure` when within `budget`; TensorFlow loads here."""
    import keras

    from workbench import models, optim
    from workbench.study.compose import compose

    size = input_size or ARCHITECTURES[name].native_size
    cfg = compose([f"model={name}", f"model.input_size={size}", f"optimizer={optimizer}", "schedule=constant"])
    keras.backend.clear_session()
    model = models.build(cfg.model, classes)
    opt = optim.build_optimizer(cfg.optimizer, cfg.schedule, steps_per_epoch=1, epochs=1)
    opt.build(model.trainable_variables)
    macs, outputs = _count(model)
    row = Row(
        name=name,
        input_size=size,
        native_input_size=ARCHITECTURES[name].native_size,
        min_input_size=ARCHITECTURES[name].min_size,
        parameters=model.count_params(),
        trainable_parameters=sum(math.prod(v.shape) for v in model.trainable_variables),
        gmacs=macs / 1e9,
        weights_and_optimizer_bytes=_bytes(model.variables) + _bytes(opt.variables),
        activation_bytes=outputs * batch_size * 4,
        images_per_second=None,
    )
    if measure and not budget.over(row):  # a row left out is not worth compiling a training step for
        speed = _measure(model, opt, models.jit_compile(cfg.model.jit_compile), size, classes, batch_size)
        row = dataclasses.replace(row, images_per_second=speed)
    keras.backend.clear_session()
    return row


def _count(model: keras.Model) -> tuple[int, int]:
    """Multiply-accumulates per image of conv and dense layers, and the number of values every layer
    outputs per image, through nested models (the backbone)."""
    import keras

    macs = outputs = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner = _count(layer)
            macs, outputs = macs + inner[0], outputs + inner[1]
            continue
        if isinstance(layer, keras.layers.InputLayer):
            continue
        out = layer.output.shape
        per_image = math.prod(out[1:])
        outputs += per_image
        if isinstance(layer, keras.layers.SeparableConv2D | keras.layers.DepthwiseConv2D):
            channels = layer.input.shape[-1] * layer.depth_multiplier
            positions = math.prod(out[1:-1])
            macs += positions * channels * math.prod(layer.kernel_size)
            if isinstance(layer, keras.layers.SeparableConv2D):
                macs += positions * channels * out[-1]  # the pointwise 1x1 after the depthwise step
        elif isinstance(layer, keras.layers.Conv2D):
            macs += per_image * math.prod(layer.kernel_size) * layer.input.shape[-1] // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            macs += per_image * layer.input.shape[-1]
    return macs, outputs


def _bytes(variables: Iterable[keras.Variable]) -> int:
    import numpy as np

    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)


def _measure(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    jit_compile: bool | str,
    size: int,
    classes: int,
    batch_size: int,
) -> float:
    import keras
    import numpy as np

    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(), jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch_size, size, size, 3)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, classes, batch_size), classes)
    model.train_on_batch(images, labels)  # traces and compiles the step: not timed
    started = time.perf_counter()
    for _ in range(MEASURED_STEPS):
        model.train_on_batch(images, labels)
    return MEASURED_STEPS * batch_size / (time.perf_counter() - started)


def millions(count: float) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}K"


def size_text(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1e3:.0f} KB"


def table(rows: list[Row]) -> list[str]:
    """The rows as a readable table."""
    header = ["architecture", "input", "native", "min", "params", "trainable", "GMACs", "weights+opt", "activations"]
    measured = any(r.images_per_second is not None for r in rows)
    lines = [header + (["images/s"] if measured else [])]
    for r in rows:
        cells = [
            r.name,
            str(r.input_size),
            str(r.native_input_size),
            str(r.min_input_size),
            millions(r.parameters),
            millions(r.trainable_parameters),
            f"{r.gmacs:.3g}",
            size_text(r.weights_and_optimizer_bytes),
            size_text(r.activation_bytes),
        ]
        if measured:
            cells.append(f"{r.images_per_second:.1f}" if r.images_per_second is not None else "")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    aligned = []
    for line in lines:  # the name left-aligned, the numbers right-aligned
        aligned.append(
            "  ".join([line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))])
        )
    return aligned
