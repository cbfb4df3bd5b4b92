"""Layers: switchable BN (RS-Nets), meta convolutions (SAN), width-slimmable layers (US-Net / MutualNet), stage resizing
(Resizable networks), LQ-Nets quantizers (quantized RS-Nets), and BN calibration per operating point. Every adaptive
layer implements one interface (flexres.nn.adaptive): how it applies an operating point, which plain layer it
becomes."""

from .adaptive import AdaptiveLayer, PointSetting, adaptive_layers, deployed_params, make_static, materialize_into
from .calibration import CalibratableModel, calibrate_bn
from .meta_conv import MetaConv2d, scale_encoding
from .quantize import (
    FULL_PRECISION,
    FixedLevels,
    LQQuantizer,
    QuantConv2d,
    compile_quantizers,
    encodings,
    is_quantized,
    least_squares_basis,
    level_counts_and_sums,
    nearest_codes,
    passing_uninitialized,
    quantization_error,
    quantization_levels,
    quantize_with,
    quantizer_step,
)
from .slimmable import (
    ROUNDING_RULES,
    SlimmableBatchNorm2d,
    SlimmableConv2d,
    SlimmableLinear,
    keep_full_width,
    make_divisible,
    set_channel_ratio,
    set_rounding,
    slim_channels,
)
from .stage_resize import FixedResize, StageResize, factor_key, stage_size
from .switchable_bn import BN_POLICIES, BNChoice, SwitchableBatchNorm2d, nearest_index, plan_bn

__all__ = [
    "AdaptiveLayer",
    "PointSetting",
    "adaptive_layers",
    "deployed_params",
    "make_static",
    "materialize_into",
    "FULL_PRECISION",
    "FixedLevels",
    "LQQuantizer",
    "QuantConv2d",
    "compile_quantizers",
    "encodings",
    "is_quantized",
    "least_squares_basis",
    "level_counts_and_sums",
    "nearest_codes",
    "passing_uninitialized",
    "quantization_error",
    "quantization_levels",
    "quantize_with",
    "quantizer_step",
    "BN_POLICIES",
    "BNChoice",
    "CalibratableModel",
    "FixedResize",
    "MetaConv2d",
    "SlimmableBatchNorm2d",
    "SlimmableConv2d",
    "SlimmableLinear",
    "StageResize",
    "SwitchableBatchNorm2d",
    "calibrate_bn",
    "factor_key",
    "keep_full_width",
    "make_divisible",
    "nearest_index",
    "plan_bn",
    "ROUNDING_RULES",
    "scale_encoding",
    "set_channel_ratio",
    "set_rounding",
    "slim_channels",
    "stage_size",
]
