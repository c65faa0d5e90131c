"""INT8 post-training quantization of exported ONNX models (ONNX Runtime's quantization tools)."""

from icnn_compress.quantize._int8 import (
    CALIBRATION_METHODS,
    QuantizeOptions,
    QuantizeResult,
    quantize_onnx,
    reduce_range_needed,
)

__all__ = ["CALIBRATION_METHODS", "QuantizeOptions", "QuantizeResult", "quantize_onnx", "reduce_range_needed"]
