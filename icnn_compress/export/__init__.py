"""ONNX export and checks."""

from icnn_compress.export._onnx import DEFAULT_OPSET, ExportError, ExportResult, export_onnx, read_metadata

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportResult", "export_onnx", "read_metadata"]
