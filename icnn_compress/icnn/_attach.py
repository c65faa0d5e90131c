"""Attach the mask layer and the filter loss to named layers of any ``nn.Module``."""

from __future__ import annotations

import difflib
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from icnn_compress.errors import ICNNError
from icnn_compress.icnn._loss import FilterLossState
from icnn_compress.icnn._mask import ICNNMask
from icnn_compress.icnn._options import ICNNOptions

__all__ = ["ICNNHandle", "attach_icnn", "find_activation", "last_conv_name", "top_layers", "trace_graph"]

_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def _get(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ICNNError(f"The model has no module named {name!r}.{hint}")
    return modules[name]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def last_conv_name(model: nn.Module) -> str:
    """Name of the last ``nn.Conv2d`` registered in ``model`` (the paper's "top conv layer")."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ICNNError("layers='auto' needs a model with at least one nn.Conv2d; this model has none.")
    return names[-1]


def top_layers(model: nn.Module, k: int = 1) -> list[str]:
    """The ``k`` top places for the loss, deepest last: the last ``k`` conv layers, or for a ResNet
    (children ``layer1``, ``layer2``... that are ``nn.Sequential``) the outputs of its last ``k``
    residual blocks, which are post-ReLU (a block's last conv feeds the residual add, not a ReLU).
    ``layers="auto"`` means ``top_layers(model, 1)``."""
    if not isinstance(k, int) or k < 1:
        raise ICNNError(f"k must be an int >= 1. Got {k!r} instead.")
    stages = [n for n, m in model.named_children() if n.startswith("layer") and isinstance(m, nn.Sequential)]
    if stages:
        blocks = [f"{s}.{i}" for s in stages for i in range(len(getattr(model, s)))]
        if blocks:
            return blocks[-k:]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ICNNError("layers='auto' needs a model with at least one nn.Conv2d; this model has none.")
    return convs[-k:]


def trace_graph(model: nn.Module) -> torch.fx.Graph | None:
    """The model's ``torch.fx`` graph, or ``None`` when it cannot be traced symbolically."""
    try:
        return torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow and the like
        return None


_TRACE = object()  # find_activation's default: trace the model itself


def find_activation(model: nn.Module, conv_name: str, *, graph=_TRACE) -> str:
    """Name of the ReLU module that takes a conv's output (through an optional BatchNorm).

    Traced with ``torch.fx`` where possible (``graph``: a ``trace_graph(model)`` already made, so
    that many convs cost one trace); otherwise the conv's next siblings in an ``nn.Sequential``.
    Raises ``ICNNError`` when no single-use ReLU module follows.
    """
    hint = (
        f"name the activation module after {conv_name!r}, or a block whose output is post-ReLU "
        "(for example torchvision ResNet's 'layer4')"
    )
    if graph is _TRACE:
        graph = trace_graph(model)  # None: untraceable, fall back to nn.Sequential order
    if graph is not None:
        uses: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                uses[node.target] = uses.get(node.target, 0) + 1
        node = next((n for n in graph.nodes if n.op == "call_module" and n.target == conv_name), None)
        while node is not None:
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module":
                break
            nxt = users[0]
            mod = model.get_submodule(nxt.target)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                node = nxt
                continue
            if isinstance(mod, _ACTIVATIONS):
                if uses[nxt.target] > 1:
                    raise ICNNError(
                        f"The activation {nxt.target!r} after {conv_name!r} is shared by "
                        f"{uses[nxt.target]} calls, so a hook on it would mask all of them; {hint}."
                    )
                return str(nxt.target)
            break
        raise ICNNError(f"No ReLU module takes the output of {conv_name!r} (through BatchNorm); {hint}.")
    parent_name, _, child = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential):
        names = [n for n, _ in parent.named_children()]
        for nxt in names[names.index(child) + 1 :]:
            mod = getattr(parent, nxt)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                continue
            if isinstance(mod, _ACTIVATIONS):
                return f"{parent_name}.{nxt}" if parent_name else nxt
            break
    raise ICNNError(f"Could not find the ReLU after {conv_name!r} (the model is not fx-traceable); {hint}.")


class _ResetCalls:
    """Forward pre-hook of the root model: resets the per-forward call counters of a handle.

    Holds the handle weakly, and a copy of the model gets an inert hook: copies and pickles of a
    model never drag the loss state (or tensors of the last forward pass) along."""

    def __init__(self, handle: ICNNHandle | None) -> None:
        self._handle = weakref.ref(handle) if handle is not None else None

    def __call__(self, module: nn.Module, inputs) -> None:
        handle = self._handle() if self._handle is not None else None
        if handle is not None:
            handle._reset_calls(module, inputs)

    def __deepcopy__(self, memo) -> _ResetCalls:
        return _ResetCalls(None)

    def __reduce__(self):
        return (_ResetCalls, (None,))


@dataclass
class _Site:
    """One place where maps are masked and fed to the loss."""

    name: str  # the key users see (the conv or module they named, or '<name>.icnn_conv')
    mask: ICNNMask
    state: FilterLossState | None = None  # created at the first forward (channel count known)
    maps: Tensor | None = None
    calls: int = 0

    def record(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            raise ICNNError(
                f"The ICNN layer {self.name!r} ran {self.calls} times in one forward pass: its module is "
                "shared (for example torchvision ResNet's block.relu); attach to the block instead."
            )
        self.maps = x
        if self._balance and self.state is not None:
            return self.state.tap(x)
        return x

    _balance: bool = field(default=False, repr=False)


class ICNNHandle:
    """What ``attach_icnn`` returns: the loss, the filter categories and the life cycle of the hooks.

    Attributes:
        layers: the layer names (as given, with ``"auto"`` resolved), plus ``'<name>.icnn_conv'`` for
            every inserted interpretable conv layer; the keys of ``filter_categories``.
        hook_points: layer name -> name of the module whose output is masked (the ReLU after a conv).
        last_mi: layer name -> mean MI (nats) per filter at the last ``loss`` call.
    """

    def __init__(self, model: nn.Module, num_classes: int, options: ICNNOptions) -> None:
        self.model = model
        self.num_classes = num_classes
        self.options = options
        self.layers: list[str] = []
        self.hook_points: dict[str, str] = {}
        self._last_mi: dict[str, Tensor] = {}
        self.epoch = 0
        self.step = 0
        self.frozen = False
        self.removed = False
        self._sites: dict[str, _Site] = {}
        self._point_sites: dict[str, list[_Site]] = {}
        self._extras: dict[str, tuple[str, nn.Sequential]] = {}  # hook point -> (root attr, conv+relu)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    # ----- construction -----
    def _add_point(self, layer: str, point: str, extra_conv: bool) -> None:
        opts = self.options
        mask = ICNNMask(beta=opts.beta, centre=opts.centre, enabled=opts.mask)
        site = _Site(layer, mask, _balance=opts.balance == "grad")
        mask.set_recorder(site.record)
        sites = [site]
        self.layers.append(layer)
        self.hook_points[layer] = point
        if extra_conv:
            module = _get(self.model, point)
            channels = self._channels_of(layer, module)
            # registered on the activation module (a leaf whose forward ignores children), so the
            # new parameters are in model.parameters() without changing any existing key
            extra = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
            module.add_module("icnn_conv", extra)
            attr = f"{point}.icnn_conv"
            self._extras[point] = (attr, extra)
            extra_name = f"{layer}.icnn_conv"
            extra_mask = ICNNMask(beta=opts.beta, centre=opts.centre, enabled=opts.mask)
            extra_site = _Site(extra_name, extra_mask, _balance=site._balance)
            extra_mask.set_recorder(extra_site.record)
            sites.append(extra_site)
            self.layers.append(extra_name)
            self.hook_points[extra_name] = attr
        for s in sites:
            self._sites[s.name] = s
        self._point_sites[point] = sites
        self._hooks.append(_get(self.model, point).register_forward_hook(self._make_hook(point)))

    def _channels_of(self, layer: str, module: nn.Module) -> int:
        conv = _get(self.model, layer)
        if isinstance(conv, nn.Conv2d) and isinstance(module, _ACTIVATIONS):
            return conv.out_channels
        raise ICNNError(f"extra_conv on {layer!r} needs a Conv2d layer name (followed by its ReLU).")

    def _make_hook(self, point: str):
        def hook(module: nn.Module, inputs, output: Tensor) -> Tensor:
            return self._apply_point(point, output)

        return hook

    def _apply_point(self, point: str, x: Tensor) -> Tensor:
        sites = self._point_sites[point]
        x = sites[0].mask(x)
        if len(sites) > 1:
            x = sites[1].mask(self._extras[point][1](x))
        return x

    def _reset_calls(self, module: nn.Module, inputs) -> None:
        for site in self._sites.values():
            site.calls = 0

    # ----- public API -----
    @property
    def filter_categories(self) -> dict[str, Tensor]:
        """Layer name -> ``LongTensor[C]`` of per-filter classes (-1 before the first ``loss`` call)."""
        out = {}
        for name, site in self._sites.items():
            out[name] = (
                site.state.categories.cpu().clone()
                if site.state is not None
                else torch.empty(0, dtype=torch.long)
            )
        return out

    def lambda_factor(self) -> float:
        """Multiplier of ``weight`` at the current epoch/step (schedule and warm-up)."""
        factor = 1.0 / (self.epoch + 1) if self.options.schedule == "paper" else 1.0
        warm = self.options.warmup_steps
        if warm > 0:
            factor *= min(1.0, (self.step + 1) / warm)
        return factor

    def set_epoch(self, epoch: int) -> None:
        """Tell the handle the current epoch (0-based), for the ``"paper"`` 1/t schedule."""
        self.epoch = int(epoch)

    def loss(self, targets: Tensor) -> Tensor:
        """The weighted filter loss of the last forward pass, summed over layers.

        Args:
            targets: ``(N,)`` integer class indices in ``[0, num_classes)`` of that batch.

        Returns:
            A scalar to add to the task loss. Its backward is the paper's label-driven approximate
            gradient (docs/method.md section 4) times lambda; its value is ``-lambda * sum_f MI_f``.
        """
        if self.removed:
            raise ICNNError("This ICNN handle was removed; attach_icnn again to use the loss.")
        if not torch.is_tensor(targets) or targets.dim() != 1:
            raise ICNNError(
                f"targets must be a 1-D tensor of class indices. Got {type(targets).__name__}"
                f"{'' if not torch.is_tensor(targets) else ' of shape ' + str(tuple(targets.shape))} instead."
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ICNNError(f"targets must hold integer class indices. Got dtype {targets.dtype} instead.")
        # value checks read the device: on the first step and every 50th, not on every step
        check = self.step % 50 == 0
        if check and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            raise ICNNError(
                f"targets must be in [0, {self.num_classes}) for num_classes={self.num_classes}. "
                f"Got values in [{int(targets.min())}, {int(targets.max())}] instead."
            )
        opts = self.options
        weight = opts.weight * self.lambda_factor()
        total = None
        for name, site in self._sites.items():
            maps = site.maps
            if maps is None:
                raise ICNNError(
                    f"No maps recorded for {name!r}: run the model's forward (with grad enabled) first."
                )
            if maps.shape[0] != targets.shape[0]:
                raise ICNNError(
                    f"targets has {targets.shape[0]} entries but the last forward pass had "
                    f"{maps.shape[0]} images."
                )
            if (check or site.state is None) and bool((maps.detach() < 0).any()):
                raise ICNNError(
                    f"The maps of {name!r} have negative values (min {float(maps.detach().min()):.3g}); "
                    "the loss needs feature maps after ReLU: attach to the conv (its ReLU is found) "
                    "or to the activation module."
                )
            if site.state is None:
                site.state = self._new_state(maps.shape[1])
            loss, mi = site.state.loss(
                maps,
                targets.to(maps.device),
                tau=opts.tau,
                beta=opts.beta,
                normalize=opts.normalize == "mean_max",
                balance=opts.balance == "grad",
                weight=weight,
            )
            self._last_mi[name] = mi.detach().mean()
            site.maps = None
            total = loss if total is None else total + loss
        self.step += 1
        return total

    def set_masks(self, enabled: bool) -> None:
        """Switch every mask of this handle on or off (before or after ``freeze``). Off, a mask is
        an identity in the forward pass while the loss still sees the maps: e.g. train with the
        masks, then continue without them so that the deployed model keeps all its activations."""
        for site in self._sites.values():
            site.mask.enabled = bool(enabled)

    @property
    def last_mi(self) -> dict[str, float]:
        """Layer name -> mean MI (nats) per filter at the last ``loss`` call (reading it syncs)."""
        return {k: float(v) for k, v in self._last_mi.items()}

    @property
    def skipped_images(self) -> dict[str, int]:
        """Layer name -> images left out of the loss so far because their maps were not finite."""
        return {n: (s.state.skipped if s.state is not None else 0) for n, s in self._sites.items()}

    def _new_state(self, channels: int) -> FilterLossState:
        return FilterLossState(channels, self.num_classes, self.options)

    def freeze(self) -> dict[str, str]:
        """Turn the hooks into real modules inside the model, so export and pruning keep the masks.

        The hook point ``P`` (the ReLU after a conv, or the block you named) becomes
        ``nn.Sequential(P, mask[, conv, relu, mask])``; when ``P`` already is an ``nn.Sequential`` the
        modules are appended to it instead, so its state-dict keys stay the same. The loss keeps
        working after ``freeze``.

        Returns:
            hook point name -> the name under which the masked output is now produced.
        """
        if self.removed:
            raise ICNNError("This ICNN handle was removed; nothing to freeze.")
        if self.frozen:
            return {p: p for p in self._point_sites}
        for h in self._hooks[1:]:
            h.remove()
        self._hooks = self._hooks[:1]
        for point, sites in self._point_sites.items():
            module = _get(self.model, point)
            extra = []
            if len(sites) > 1:
                _, seq = self._extras[point]
                del module._modules["icnn_conv"]
                extra = [seq, sites[1].mask]
            if isinstance(module, nn.Sequential):
                for m in [sites[0].mask, *extra]:
                    module.append(m)
            else:
                _set(self.model, point, nn.Sequential(module, sites[0].mask, *extra))
        self.frozen = True
        return {p: p for p in self._point_sites}

    def remove(self) -> None:
        """Detach everything and restore the model exactly (before any training happened)."""
        if self.frozen:
            raise ICNNError(
                "The masks were frozen into the model and are part of it now; remove() is only "
                "for detaching hooks before freeze()."
            )
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for point in self._extras:
            del _get(self.model, point)._modules["icnn_conv"]
        self._extras = {}
        for site in self._sites.values():
            site.mask.set_recorder(None)
            site.maps = None
        self.removed = True

    def state_dict(self) -> dict:
        """Running estimates, categories and schedule position, for checkpoints."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "sites": {
                n: (s.state.state_dict() if s.state is not None else None) for n, s in self._sites.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        for name, st in state["sites"].items():
            if name not in self._sites:
                raise ICNNError(
                    f"ICNN state has a layer {name!r} that this handle does not have ({self.layers})."
                )
            if st is None:
                continue
            site = self._sites[name]
            site.state = self._new_state(st["class_stats"].shape[0])
            site.state.load_state_dict(st)


# model -> the handles attached to it (to refuse a second mask on the same layer)
_HANDLES: weakref.WeakKeyDictionary[nn.Module, list[ICNNHandle]] = weakref.WeakKeyDictionary()


def attach_icnn(
    model: nn.Module,
    layers: str | list[str] = "auto",
    num_classes: int = 2,
    options: ICNNOptions | None = None,
    *,
    extra_conv: bool | list[str] = False,
    **option_values,
) -> ICNNHandle:
    """Make the filters of named conv layers interpretable: masks in the forward pass, plus the loss.

    Args:
        model: any CNN; it is changed only through forward hooks (and, with ``extra_conv``, new
            submodules) until ``handle.freeze()``.
        layers: module names: a ``Conv2d`` (its ReLU, through BatchNorm, is found and masked), an
            activation module, or a block whose output is post-ReLU. ``"auto"``: ``top_layers(model, 1)``
            (the last conv layer; for a ResNet the last residual block).
        num_classes: K, the number of classes of the targets passed to ``handle.loss``.
        options: an ``ICNNOptions`` (the loss's weight and balance, warm-up, schedule, templates,
            mask, categories, ...; see its attributes). Default: ``ICNNOptions()``.
        **option_values: the same options as keywords (``weight=0.5, warmup_steps=200``); given
            with ``options`` they replace its values. An unknown name is an error.
        extra_conv: ``True`` (every layer) or a list of layer names on top of which the paper's
            extra 3x3 conv + ReLU with interpretable filters is inserted (named ``<layer>.icnn_conv``).

    Returns:
        An ``ICNNHandle``.

    Example:
        >>> icnn = attach_icnn(model, "features.8", num_classes=10)
        >>> loss = F.cross_entropy(model(x), y) + icnn.loss(y)
    """
    if options is not None and not isinstance(options, ICNNOptions):
        raise ICNNError(f"options must be an ICNNOptions. Got a {type(options).__name__} instead.")
    if options is None or option_values:
        options = ICNNOptions.from_kwargs(**{**(asdict(options) if options else {}), **option_values})
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or num_classes < 1
        or (options.categories != "single" and num_classes < 2)
    ):
        raise ICNNError(
            f"num_classes must be an int >= 2 (>= 1 with categories='single'). Got {num_classes!r} instead."
        )
    FilterLossState(1, num_classes, options)  # checks positive_class against num_classes, before any hook

    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ICNNError("layers must name at least one layer (or be 'auto').")
    names = [top_layers(model, 1)[0] if n == "auto" else n for n in names]
    if len(set(names)) != len(names):
        raise ICNNError(f"layers has duplicates: {names}.")
    extra_names = set(names if extra_conv is True else (extra_conv or []))
    unknown = extra_names - set(names)
    if unknown:
        raise ICNNError(f"extra_conv names {sorted(unknown)}, which are not in layers {names}.")

    handle = ICNNHandle(model, num_classes, options)
    points = []
    for name in names:
        module = _get(model, name)
        if not isinstance(module, (nn.Conv2d, *_ACTIVATIONS)) and not any(
            isinstance(m, nn.Conv2d) for m in module.modules()
        ):
            raise ICNNError(
                f"Layer {name!r} is a {type(module).__name__}, not a conv layer: name an nn.Conv2d, "
                "its ReLU, or a block of conv layers whose output is post-ReLU."
            )
        try:
            point = find_activation(model, name) if isinstance(module, nn.Conv2d) else name
        except ICNNError:
            frozen = [n for n, m in model.named_modules() if isinstance(m, ICNNMask)]
            if frozen:
                raise ICNNError(
                    f"Layer {name!r} cannot be resolved: the model already has frozen ICNN masks "
                    f"({', '.join(frozen[:4])}); attach_icnn once per layer, before freeze()."
                ) from None
            raise
        if point in points:
            raise ICNNError(f"Two layers resolve to the same activation {point!r}: {names}.")
        points.append(point)
    live = [h for h in _HANDLES.get(model, []) if not h.removed]
    for name, point in zip(names, points, strict=False):
        taken = any(point in h._point_sites for h in live)
        if taken or any(isinstance(m, ICNNMask) for m in _get(model, point).modules()):
            raise ICNNError(
                f"Layer {name!r} already has an ICNN mask (its activation {point!r}): attach_icnn once "
                "per layer, or call remove() on the first handle before attaching again."
            )
    for name, point in zip(names, points, strict=False):
        handle._add_point(name, point, name in extra_names)
    _HANDLES.setdefault(model, []).append(handle)
    handle._hooks.insert(0, model.register_forward_pre_hook(_ResetCalls(handle)))
    return handle
