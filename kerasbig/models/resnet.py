"""Residual network for images (He et al. 2015), functional API.

    stem conv -> stages of residual blocks (stride 2 at the start of every stage after the first)
    -> global average pool -> logits

A block adds its input to its output; when the shape changes (stride or width) the input goes through a
1x1 convolution first (projection shortcut). Every convolution is followed by BatchNorm.
"""
from __future__ import annotations

import keras

from kerasbig.data.spec import DataSpec
from kerasbig.errors import UsageError


def _conv_bn(x, filters: int, kernel_size: int, strides: int = 1, *, name: str):
    x = keras.layers.Conv2D(filters, kernel_size, strides, padding="same", use_bias=False,
                            kernel_initializer="he_normal", name=f"{name}_conv")(x)
    return keras.layers.BatchNormalization(name=f"{name}_bn")(x)


def _shortcut(x, width: int, strides: int, name: str):
    if strides == 1 and x.shape[-1] == width:
        return x
    return _conv_bn(x, width, 1, strides, name=f"{name}_projection")


def _basic_block(x, width: int, strides: int, name: str):
    """3x3 conv -> 3x3 conv, both `width` wide."""
    y = keras.layers.ReLU()(_conv_bn(x, width, 3, strides, name=f"{name}_1"))
    y = _conv_bn(y, width, 3, name=f"{name}_2")
    return keras.layers.ReLU()(y + _shortcut(x, width, strides, name))


def _bottleneck_block(x, width: int, strides: int, name: str):
    """1x1 conv down to width/4 -> 3x3 conv -> 1x1 conv back up to `width`: cheaper for wide stages."""
    y = keras.layers.ReLU()(_conv_bn(x, width // 4, 1, name=f"{name}_1"))
    y = keras.layers.ReLU()(_conv_bn(y, width // 4, 3, strides, name=f"{name}_2"))
    y = _conv_bn(y, width, 1, name=f"{name}_3")
    return keras.layers.ReLU()(y + _shortcut(x, width, strides, name))


def _check(spec: DataSpec, stage_widths: tuple[int, ...], blocks_per_stage: tuple[int, ...], bottleneck: bool,
           stem_width: int, dropout: float) -> None:
    if len(spec.input_shape) != 3:
        raise UsageError(f"resnet needs images of shape (height, width, channels); the data has {spec.input_shape}")
    if not stage_widths or len(stage_widths) != len(blocks_per_stage):
        raise UsageError(f"resnet stage_widths={stage_widths} and blocks_per_stage={blocks_per_stage} must be "
                         "non-empty and of equal length")
    if min(*stage_widths, *blocks_per_stage, stem_width) < 1:
        raise UsageError("resnet stage_widths, blocks_per_stage and stem_width must be positive")
    if bottleneck and any(width % 4 for width in stage_widths):
        raise UsageError(f"resnet bottleneck blocks need stage_widths divisible by 4, got {stage_widths}")
    if not 0 <= dropout < 1:
        raise UsageError(f"resnet dropout={dropout} must be in [0, 1)")


def build_resnet(spec: DataSpec, *, stage_widths: tuple[int, ...] = (32, 64),
                 blocks_per_stage: tuple[int, ...] = (2, 2), bottleneck: bool = False, stem_width: int = 32,
                 dropout: float = 0.0) -> keras.Model:
    """A ResNet with `blocks_per_stage[i]` blocks of output width `stage_widths[i]` in stage i.

    >>> from kerasbig.data.spec import DataSpec
    >>> spec = DataSpec("classification", "image", (32, 32, 3), "float32", 10)
    >>> build_resnet(spec, stage_widths=(8, 16), blocks_per_stage=(1, 1)).output_shape
    (None, 10)
    """
    _check(spec, stage_widths, blocks_per_stage, bottleneck, stem_width, dropout)
    block = _bottleneck_block if bottleneck else _basic_block
    image = keras.Input(spec.input_shape, dtype=spec.input_dtype, name=spec.input_name)
    x = keras.layers.ReLU()(_conv_bn(image, stem_width, 3, name="stem"))
    for stage, (width, blocks) in enumerate(zip(stage_widths, blocks_per_stage)):
        for i in range(blocks):
            strides = 2 if stage > 0 and i == 0 else 1
            x = block(x, width, strides, name=f"stage_{stage}_block_{i}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout)(x)
    logits = keras.layers.Dense(spec.num_classes, dtype="float32", name="logits")(x)
    return keras.Model(image, logits, name="resnet")
