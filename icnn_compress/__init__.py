"""icnn-compress: interpretable filters, filter clustering, real pruning, ONNX export."""

from icnn_compress._version import __version__
from icnn_compress.errors import ConfigError, DataError, IcnnCompressError, ICNNError, TrainingError
from icnn_compress.icnn import ICNNHandle, attach_icnn

__all__ = [
    "ConfigError",
    "DataError",
    "ICNNError",
    "ICNNHandle",
    "IcnnCompressError",
    "TrainingError",
    "__version__",
    "attach_icnn",
]
