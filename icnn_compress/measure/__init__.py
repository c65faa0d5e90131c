"""Measure deployed models: ONNX Runtime latency and accuracy, eager latency, MACs and params."""

from icnn_compress.measure._accuracy import model_stats, ort_accuracy
from icnn_compress.measure._latency import (
    LatencyStats,
    ort_latency,
    ort_session,
    pick_providers,
    time_callable,
    torch_latency,
)
from icnn_compress.measure._report_data import latency_guard, measure

__all__ = [
    "LatencyStats",
    "latency_guard",
    "measure",
    "model_stats",
    "ort_accuracy",
    "ort_latency",
    "ort_session",
    "pick_providers",
    "time_callable",
    "torch_latency",
]
