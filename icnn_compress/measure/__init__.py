"""Measure deployed models: ONNX Runtime latency and accuracy, eager latency, MACs and params."""

from icnn_compress.measure._accuracy import class_accuracy, model_stats, ort_accuracy, ort_confusion
from icnn_compress.measure._deployed import latency_guard, measure
from icnn_compress.measure._latency import (
    SPIN_SETTLE_S,
    LatencyStats,
    ort_latency,
    ort_session,
    pick_providers,
    time_callable,
    torch_latency,
)
from icnn_compress.measure._speedup import SpeedupTimer

__all__ = [
    "SPIN_SETTLE_S",
    "LatencyStats",
    "SpeedupTimer",
    "class_accuracy",
    "latency_guard",
    "measure",
    "model_stats",
    "ort_accuracy",
    "ort_confusion",
    "ort_latency",
    "ort_session",
    "pick_providers",
    "time_callable",
    "torch_latency",
]
