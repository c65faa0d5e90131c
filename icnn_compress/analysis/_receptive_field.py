"""Receptive fields from a model's own conv/pool geometry, by tracing it with torch.fx."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from icnn_compress.errors import ConfigError

__all__ = ["RF", "receptive_field"]


@dataclass(frozen=True)
class RF:
    """Receptive field of the units of one layer, in input pixels.

    The unit at (row i, col j) is centred at ``(offset + stride * j, offset + stride * i)`` (x, y)
    and sees ``size x size`` input pixels (the theoretical field, before clipping at the borders).
    """

    size: float
    stride: float
    offset: float

    def centre(self, i, j):
        """``(x, y)`` of unit ``(i, j)``; works on numbers and tensors."""
        return self.offset + self.stride * j, self.offset + self.stride * i


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from icnn_compress.icnn import ICNNMask

        return isinstance(m, ICNNMask) or super().is_leaf_module(m, qualname)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _geometry(target, args, kwargs, module: nn.Module | None):
    """``(kernel, stride, padding, dilation)`` of a windowed op (rows only: square ops assumed)."""
    if module is not None:
        k, s, p = _pair(module.kernel_size), _pair(module.stride or module.kernel_size), _pair(module.padding)
        d = _pair(getattr(module, "dilation", 1))
        return k[0], s[0], p[0], d[0]
    if target in (F.max_pool2d, F.avg_pool2d, torch.max_pool2d):
        k = _pair(args[1] if len(args) > 1 else kwargs["kernel_size"])
        s = args[2] if len(args) > 2 else kwargs.get("stride")
        s = _pair(s) if s else k
        p = _pair(args[3] if len(args) > 3 else kwargs.get("padding", 0))
        return k[0], s[0], p[0], 1
    return None


_PASS_FUNCS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.hardtanh,
    torch.sigmoid,
    F.dropout,
    operator.add,
    operator.mul,
    torch.add,
    torch.mul,
    torch.cat,
    F.batch_norm,
}


def receptive_field(model: nn.Module, layer: str, input_size: tuple[int, ...]) -> RF:
    """Receptive field of the output of module ``layer`` (see ``receptive_fields``)."""
    return receptive_fields(model, [layer], input_size)[layer]


def receptive_fields(
    model: nn.Module, layers: list[str], input_size: tuple[int, ...], *, strict: bool = True
) -> dict[str, RF]:
    """Receptive field of the output of module ``layer`` for inputs of ``input_size``.

    Composes kernel, stride, padding and dilation of every conv/pool on the traced paths from
    the input to ``layer``; where paths join (residual adds, concatenations) the widest field
    is kept. Elementwise ops pass through; any op that changes the spatial size and is not a
    conv/pool raises ``ConfigError``.

    Args:
        model: an fx-traceable model (torchvision models are).
        layer: module name, e.g. ``"features.28"`` (VGG-16 conv5_3: size 196, stride 16).
        input_size: ``(C, H, W)`` or ``(N, C, H, W)``.
        strict: a layer without a field (not spatial, e.g. a squeeze-excitation conv after a
            pooling to 1x1) raises ``ConfigError``; ``False``: it is left out of the result
            (one trace for any number of layers).

    Example:
        >>> receptive_field(torchvision.models.vgg16(), "features.28", (3, 224, 224)).size
        196.0
    """
    modules = dict(model.named_modules())
    for layer in layers:
        if layer not in modules:
            raise ConfigError(f"The model has no module named {layer!r}.")
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        raise ConfigError(f"receptive_field needs an fx-traceable model; tracing failed: {exc}") from exc
    gm = fx.GraphModule(model, graph)
    shape = tuple(input_size) if len(input_size) == 4 else (1, *input_size)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(shape, device=next(model.parameters()).device))
    model.train(was_training)
    rf: dict[fx.Node, tuple[float, float, float]] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            rf[node] = (1.0, 1.0, 0.0)
            continue
        ins = [a for a in node.all_input_nodes if a in rf]
        if node.op == "output" or not ins:
            continue
        # widest incoming field (residual joins); strides must agree
        src = max(ins, key=lambda a: rf[a][0])
        size, stride, offset = rf[src]
        module = modules.get(node.target) if node.op == "call_module" else None
        geo = None
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            geo = _geometry(node.target, node.args, node.kwargs, module)
        elif node.op == "call_function":
            geo = _geometry(node.target, node.args, node.kwargs, None)
        if geo is not None:
            k, s, p, d = geo
            k_eff = d * (k - 1) + 1
            size = size + (k_eff - 1) * stride
            offset = offset + ((k_eff - 1) / 2 - p) * stride
            stride = stride * s
        else:
            meta_in = src.meta.get("tensor_meta")
            meta_out = node.meta.get("tensor_meta")
            same = (
                meta_in is not None
                and meta_out is not None
                and hasattr(meta_out, "shape")
                and len(meta_out.shape) == 4
                and tuple(meta_in.shape[-2:]) == tuple(meta_out.shape[-2:])
            )
            if not same:
                if strict and node.op == "call_module" and node.target in layers:
                    raise ConfigError(
                        f"{node.target!r} does not produce a spatial map, so it has no receptive field."
                    )
                continue  # a head op (pooling to 1x1, flatten, linear): not on a path to a spatial layer
        rf[node] = (float(size), float(stride), float(offset))
    out = {}
    for layer in layers:
        try:
            out[layer] = _layer_rf(gm, rf, layer)
        except ConfigError:
            if strict:
                raise
    return out


def _layer_rf(gm: fx.GraphModule, rf: dict, layer: str) -> RF:
    """The field of ``layer``'s output: its own node, or for a container the last node inside it."""
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer and n in rf), None)
    if node is not None:
        return RF(*rf[node])
    # layer is a container (e.g. "layer4"): its output is the last node inside it
    inside = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(layer + ".")]
    inside = [n for n in inside if n in rf]
    if inside:
        prefix = layer + "."
        after = [
            n
            for n in gm.graph.nodes
            if n in rf
            and n.op == "call_function"
            and any(str(u.target).startswith(prefix) for u in n.all_input_nodes if u.op == "call_module")
        ]
        last = max(inside + after, key=lambda n: list(gm.graph.nodes).index(n))
        return RF(*rf[last])
    raise ConfigError(
        f"{layer!r} is not on a traced path from the input (it is never called, or not spatial)."
    )
