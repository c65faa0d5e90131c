"""Export failures inside torch.onnx reach the user as one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icnn_compress.export import ExportError, export_onnx


def test_an_unexportable_model_gets_one_line_and_no_graph_dump(tmp_path, capfd):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 2)
    )
    with pytest.raises(
        ExportError, match=r"adaptive_avg_pool2d.*adaptive pooling layer cannot be exported"
    ) as info:
        export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 4, 4))
    assert "\n" not in str(info.value)
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err
    assert not list(tmp_path.iterdir())  # nothing left behind
