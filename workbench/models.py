"""The architecture registry and the shared classifier head.

The registry itself is plain data, so validation can use it without importing TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras
    from omegaconf import DictConfig


@dataclass(frozen=True)
class Architecture:
    application: str | None  # the keras.applications constructor; None for small_cnn
    module: str | None  # the keras.applications module that holds its preprocess_input
    native_size: int
    min_size: int


ARCHITECTURES: dict[str, Architecture] = {
    "small_cnn": Architecture(None, None, 32, 8),
    "nasnet_large": Architecture("NASNetLarge", "nasnet", 331, 32),
    "nasnet_mobile": Architecture("NASNetMobile", "nasnet", 224, 32),
    "resnet50": Architecture("ResNet50", "resnet50", 224, 32),
    "inception_v3": Architecture("InceptionV3", "inception_v3", 299, 75),
    "mobilenet_v2": Architecture("MobileNetV2", "mobilenet_v2", 224, 32),
    "efficientnet_b0": Architecture("EfficientNetB0", "efficientnet", 224, 32),
}


# The weights of conv and dense layers that weight decay applies to: Conv2D/Dense, DepthwiseConv2D and
# SeparableConv2D name them so; BatchNormalization's gamma/beta and every bias are named otherwise.
KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")


def input_size(model_cfg: DictConfig) -> int:
    """The configured input side, or the architecture's native one."""
    return model_cfg.input_size or ARCHITECTURES[model_cfg.name].native_size


def jit_compile(value: object) -> bool | str:
    """`model.jit_compile` (auto, true or false) as Keras's compile() takes it."""
    text = str(value).lower()
    return "auto" if text == "auto" else text == "true"


def preprocessor(name: str) -> Callable[[Any], Any]:
    """The architecture's own `preprocess_input`, mapping [0, 255] RGB images to what it expects."""
    import keras

    module = ARCHITECTURES[name].module
    if module is None:
        return lambda images: images / 255.0
    return getattr(keras.applications, module).preprocess_input


def preprocessing(name: str, size: int) -> str:
    """What `preprocessor(name)` expects and does, in words, for the logged model's metadata."""
    module = ARCHITECTURES[name].module
    scaling = "divided by 255" if module is None else f"keras.applications.{module}.preprocess_input"
    return f"RGB, resized to {size}x{size} (bilinear, aspect ratio not kept), values in [0, 255] {scaling}"


def build(model_cfg: DictConfig, num_classes: int) -> keras.Model:
    """Backbone (named `backbone`) -> dropout -> dense (`classifier`) -> float32 softmax.

    From a checkpoint of ours the backbone is loaded, and the classifier too when it has `num_classes`
    outputs and `model.new_classifier` is false (the Inception trainer's `fine_tune` flag renews it).
    """
    import keras

    size = input_size(model_cfg)
    shape = (size, size, 3)
    weights = model_cfg.weights
    if weights not in (None, "imagenet"):
        weights = str(Path(weights).expanduser())
    # Our own .keras checkpoints give the backbone; other files are keras.applications weight files.
    checkpoint = weights if weights and weights.endswith(".keras") else None
    arch = ARCHITECTURES[model_cfg.name]
    if arch.application is None:
        backbone = _small_cnn(shape)
    else:
        backbone = getattr(keras.applications, arch.application)(
            include_top=False,
            weights=None if checkpoint else weights,
            input_shape=shape,
            pooling="avg",
            name="backbone",
        )

    inputs = keras.Input(shape, name="images")
    x = backbone(inputs)
    x = keras.layers.Dropout(model_cfg.dropout, name="dropout")(x)
    x = keras.layers.Dense(num_classes, name="classifier")(x)
    # Under mixed precision the softmax must stay float32, or probabilities and the loss lose precision.
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=model_cfg.name)

    if checkpoint:
        source = keras.saving.load_model(checkpoint, compile=False)
        backbone.set_weights(source.get_layer("backbone").get_weights())
        classifier = source.get_layer("classifier").get_weights()
        if classifier[0].shape[-1] == num_classes and not model_cfg.get("new_classifier", False):
            model.get_layer("classifier").set_weights(classifier)
    freeze(backbone, model_cfg.freeze)
    return model


def freeze(backbone: keras.Model, setting: str | int) -> None:
    """Freeze the whole backbone (`backbone`), or all but its last N layers (an integer). Keras runs a frozen
    BatchNormalization layer in inference mode, so its moving statistics stay as loaded too."""
    from workbench.config import ConfigError

    if setting == "none":
        return
    if setting == "backbone":
        backbone.trainable = False
        return
    layers = backbone.layers
    if int(setting) > len(layers):
        raise ConfigError(f"model.freeze={setting}: the {backbone.name} of this model has {len(layers)} layers")
    for layer in layers[: len(layers) - int(setting)]:
        layer.trainable = False


def unfreeze(backbone: keras.Model, setting: str | int) -> None:
    """The second phase of a two-phase fine-tune: every layer `freeze(backbone, setting)` froze trains again,
    except BatchNormalization layers, which stay in inference mode with their loaded statistics (as Keras's
    fine-tuning examples do: a small batch's statistics would wreck them)."""
    import keras

    if setting == "none":
        return
    frozen_norms = [
        layer
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization) and not (backbone.trainable and layer.trainable)
    ]
    backbone.trainable = True  # sets every layer's flag
    for layer in frozen_norms:
        layer.trainable = False


def _small_cnn(shape: tuple[int, int, int]) -> keras.Model:
    import keras

    layers = keras.layers
    blocks = []
    for i, filters in enumerate((32, 64, 128)):
        blocks += [
            layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}"),
            # momentum 0.9, not Keras's 0.99: short runs need moving statistics that converge quickly.
            layers.BatchNormalization(momentum=0.9, name=f"bn{i}"),
            layers.ReLU(name=f"relu{i}"),
        ]
        if i < 2:
            blocks.append(layers.MaxPooling2D(name=f"pool{i}"))
    blocks.append(layers.GlobalAveragePooling2D(name="pool"))
    return keras.Sequential([keras.Input(shape), *blocks], name="backbone")


def add_kernel_l2(model: keras.Model, weight_decay: float) -> None:
    """L2 on conv and dense kernels only (BN and biases excluded), as the TF ResNet tutorial does.

    Kernels are found by variable name (`backbone/conv0/kernel`, `.../depthwise_kernel`, `.../pointwise_kernel`).
    Variable regularizers are not saved with a model: call again after loading a checkpoint.
    """
    import keras

    for variable in model.variables:
        if variable.name in KERNELS:
            variable.regularizer = keras.regularizers.L2(weight_decay)
