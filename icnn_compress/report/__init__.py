"""Reports: versioned JSON, self-contained HTML and Markdown with figures."""

from icnn_compress.report._report import SCHEMA_VERSION, build_report, write_report

__all__ = ["SCHEMA_VERSION", "build_report", "write_report"]
