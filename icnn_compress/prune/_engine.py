"""Structural pruning to a target, through torch-pruning's dependency graph."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import traceback
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.data import DataLoader

from icnn_compress._memory import release_freed_memory
from icnn_compress._progress import progress_bar
from icnn_compress.errors import ConfigError, DataError, IcnnCompressError
from icnn_compress.prune import _refit
from icnn_compress.prune._classes import (
    KeepClassesImportance,
    check_keep_classes,
    class_responses,
    kept_class_batches,
)
from icnn_compress.prune._compensation import compensate_group
from icnn_compress.prune._criteria import criterion_spec, make_importance
from icnn_compress.prune._fisher import check_labels
from icnn_compress.prune._probe import collect_layer_inputs, reestimate_batchnorm

_log = logging.getLogger(__name__)

__all__ = [
    "PruneResult",
    "Target",
    "TargetError",
    "as_batches",
    "as_target",
    "ignored_module_names",
    "prune_filters",
    "prune_model",
    "resolve_ignored",
]


class TargetError(ConfigError):
    """The pruning target cannot be reached under the given constraints."""


class UnsupportedModelError(ConfigError):
    """torch-pruning cannot trace the channel dependencies of this model."""


def _dependency_graph(build, model: nn.Module):
    """Run ``build()`` (which traces ``model`` with torch-pruning) and turn a failure inside
    torch-pruning into one line that names the operation it stopped at. Free parameters such as
    ConvNeXt's layer scales, ``(C,)`` or ``(C, 1, 1)``, are pruned along their channels without
    torch-pruning's warning about them."""
    with _torch_pruning_errors(
        model,
        "trace the channel dependencies of",
        "reshapes that mix channels, such as ShuffleNet's channel shuffle, are not supported; "
        "nothing was changed",
    ):
        return build()


@contextlib.contextmanager
def _torch_pruning_errors(model: nn.Module, doing: str, advice: str):
    """A raw exception raised inside torch-pruning becomes one ``UnsupportedModelError`` line
    naming the layer it was handling; exceptions from elsewhere pass through unchanged."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            yield
    except IcnnCompressError:
        raise
    except Exception as exc:
        frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
        if not frames or "torch_pruning" not in frames[-1].f_code.co_filename:
            raise
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UnsupportedModelError(
            f"torch-pruning cannot {doing} this model{_failing_layer(frames, model)} "
            f"({type(exc).__name__}{': ' + text if text else ''}); {advice}."
        ) from None


def _failing_layer(frames: list, model: nn.Module) -> str:
    """`` after layer 'name'`` for the nearest layer of the model feeding the graph node that the
    failing torch-pruning frames were tracing, else `` at layer 'name'`` for the innermost layer
    they were handling."""
    names = {m: n for n, m in model.named_modules()}
    for frame in frames:
        node = frame.f_locals.get("node")
        if node is None or not hasattr(node, "inputs"):
            continue
        seen, todo = set(), [node]
        while todo:
            cur = todo.pop(0)
            if id(cur) in seen:
                continue
            seen.add(id(cur))
            if names.get(getattr(cur, "module", None)):
                return f" after layer {names[cur.module]!r}"
            todo.extend(getattr(cur, "inputs", []))
    for frame in reversed(frames):
        for key in ("layer", "module"):
            if names.get(frame.f_locals.get(key)):
                return f" at layer {names[frame.f_locals[key]]!r}"
    return ""


@dataclass(frozen=True)
class Target:
    """What to prune to: exactly one of a MACs reduction, a parameter reduction (both as factors,
    e.g. 2.0 = half) or a measured ONNX Runtime latency speedup (batch ``latency_batch``, CPU
    provider, ``latency_threads`` threads; each candidate timed in alternation with the unpruned
    model, the median ratio of five rounds, three when those agree within 2%:
    ``measure.SpeedupTimer``)."""

    macs_reduction: float | None = None
    params_reduction: float | None = None
    latency_speedup: float | None = None
    latency_batch: int = 32
    latency_threads: int = 2

    def __post_init__(self) -> None:
        given = [
            k
            for k in ("macs_reduction", "params_reduction", "latency_speedup")
            if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ConfigError(
                "Target needs exactly one of macs_reduction, params_reduction, latency_speedup. "
                f"Got {given or 'none'}."
            )
        value = getattr(self, given[0])
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 1.0):
            raise ConfigError(
                f"The '{given[0]}' of Target must be a float > 1 (e.g. 2.0). Got {value!r} instead."
            )

    @property
    def kind(self) -> str:
        return next(k for k in ("macs_reduction", "params_reduction", "latency_speedup") if getattr(self, k))

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))


@dataclass
class PruneResult:
    """The pruned model and what changed (MACs per forward of the example input)."""

    model: nn.Module
    criterion: str
    target: Target | None
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    removed: dict[str, list[int]]  # conv name -> removed output channels, in original numbering
    history: list = field(default_factory=list)  # torch-pruning's pruning history
    steps: int = 0
    latency_speedup: float | None = None
    compensated_layers: int = 0
    keep_classes: list[int] | None = None  # sorted; output i of the pruned model = keep_classes[i]
    # conv name -> removed channel -> [(kept channel, coefficient)]: the kept filters whose
    # compensation coefficients for it are largest (original numbering; compensate=True only)
    absorbed: dict[str, dict[int, list]] = field(default_factory=dict)
    classifier_refit: bool = False  # the last Linear was refit to the unpruned model's outputs

    @property
    def macs_reduction(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_reduction(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def summary(self) -> dict:
        return {
            "criterion": self.criterion,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_reduction": self.macs_reduction,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_reduction": self.params_reduction,
            "steps": self.steps,
            "latency_speedup": self.latency_speedup,
            "keep_classes": self.keep_classes,
            "classifier_refit": self.classifier_refit,
            "removed_per_layer": {k: len(v) for k, v in self.removed.items()},
        }

    def absorbed_json(self) -> dict:
        """``absorbed`` as JSON: conv -> removed channel (str) -> ``[[kept channel, coefficient]]``."""
        return {
            layer: {str(r): [[k, round(w, 4)] for k, w in ks] for r, ks in sorted(d.items())}
            for layer, d in self.absorbed.items()
        }


def _classifier(model: nn.Module) -> nn.Module | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def as_target(target) -> Target:
    """A ``Target`` from a ``Target``, a MACs-reduction factor, or a dict of ``Target`` fields."""
    if isinstance(target, Target):
        return target
    if isinstance(target, dict):
        allowed = ("macs_reduction", "params_reduction", "latency_speedup")
        bad = [k for k in target if k not in allowed]
        if bad:
            raise ConfigError(f"target has unknown key(s) {bad}; allowed: {', '.join(allowed)}.")
        try:
            return Target(**{k: float(v) for k, v in target.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"target {target!r} is not valid: {exc}") from None
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        return Target(macs_reduction=float(target))
    raise ConfigError(
        f"target must be a Target, a number (MACs reduction) or a dict such as "
        f"{{'macs_reduction': 2.0}}. Got {type(target).__name__}."
    )


def as_batches(data):
    """``data`` as something iterable of ``(images, labels, ...)`` batches: a DataLoader, or a list
    or tuple of batches (each a tuple/list whose first item is an image tensor ``(N, C, H, W)``)."""
    if data is None or isinstance(data, DataLoader):
        return data
    if isinstance(data, (list, tuple)):
        if not data:
            raise ConfigError("data is an empty list: give at least one (images, labels) batch.")
        for i, batch in enumerate(data):
            if not (isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0])):
                raise ConfigError(
                    f"data[{i}] is a {type(batch).__name__}; each batch must be a tuple "
                    "(images, labels, ...) with an image tensor of shape (N, C, H, W) first."
                )
            if batch[0].dim() != 4:
                raise ConfigError(
                    f"data[{i}][0] has shape {tuple(batch[0].shape)}; images must be (N, C, H, W)."
                )
        return list(data)
    if torch.is_tensor(data):
        raise ConfigError("data must be batches of (images, labels); a bare tensor was given. Use [(x, y)].")
    if hasattr(data, "__iter__"):
        return data
    raise ConfigError(
        f"data must be a DataLoader or a list of (images, labels) batches. Got {type(data).__name__}."
    )


def ignored_module_names(model: nn.Module, ignored) -> list[str]:
    """Names (in ``model``) of the ignored layers: names, modules of ``model`` or module types."""
    names = {m: n for n, m in model.named_modules()}
    modules = resolve_ignored(model, ignored)
    missing = [type(m).__name__ for m in modules if m not in names]
    if missing:
        raise ConfigError(
            f"ignored_layers holds a {missing[0]} that is not a module of this model (a module of "
            "another copy?): pass the module of the model you prune, or its name."
        )
    return [names[m] for m in modules]


def resolve_ignored(model: nn.Module, ignored) -> list[nn.Module]:
    """Module names, modules and module *types* -> modules. A type is expanded to every module of
    that type; one that matches nothing, or would leave no prunable layer, is refused."""
    names = dict(model.named_modules())
    out: list[nn.Module] = []
    for item in ignored or ():
        if isinstance(item, str):
            if item not in names:
                raise ConfigError(f"ignored_layers names {item!r}, which is not a module of the model.")
            out.append(names[item])
        elif isinstance(item, type):
            if not issubclass(item, nn.Module):
                raise ConfigError(
                    f"ignored_layers holds the type {item.__name__}, which is not an nn.Module type."
                )
            found = [m for m in model.modules() if isinstance(m, item)]
            if not found:
                raise ConfigError(
                    f"ignored_layers holds the type {item.__name__}, but the model has no such module."
                )
            out.extend(found)
        elif isinstance(item, nn.Module):
            out.append(item)
        else:
            raise ConfigError(f"ignored_layers entries must be names, modules or module types. Got {item!r}.")
    prunable = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in out]
    if not prunable:
        raise ConfigError("ignored_layers leaves no conv or linear layer to prune.")
    return out


# models small enough to count with one real forward (see _stats), found on their first count
_COUNT_WHERE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
_REAL_COUNT_MAX_MACS, _REAL_COUNT_MAX_PARAMS = 1e9, 5e7


def _stats(model: nn.Module, example: Tensor) -> tuple[int, int]:
    """``(MACs, parameters)`` of the model as pruning leaves it (counted once per step or more).
    The first count of a model is on the meta device; a model of at most 1 GMAC and 50 M
    parameters is counted from then on with a real forward, which costs less than the meta
    device's Python kernels there (MobileNet v2 at 64x64: 0.26 s -> 0.08 s a count)."""
    from icnn_compress.measure import model_stats

    where = _COUNT_WHERE.get(model, "meta")
    try:
        stats = model_stats(model, example, where=where)
    except Exception:  # a real forward that fails where the meta device did not: meta from now on
        if where == "meta":
            raise
        _COUNT_WHERE[model] = "meta"
        stats = model_stats(model, example, where="meta")
    if model not in _COUNT_WHERE:
        small = stats["macs"] <= _REAL_COUNT_MAX_MACS and stats["params"] <= _REAL_COUNT_MAX_PARAMS
        _COUNT_WHERE[model] = "model" if small else "meta"
    return stats["macs"], stats["params"]


def _speedup_timer(model: nn.Module, example: Tensor, target: Target):
    """A ``SpeedupTimer`` against ``model`` as it is now, on ``target``'s batch and threads."""
    from icnn_compress.measure import SpeedupTimer

    return SpeedupTimer(model, example, batch=target.latency_batch, threads=target.latency_threads)


def _taylor_gradients(model: nn.Module, loader: DataLoader, batches: int) -> None:
    model.zero_grad()
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            out = model(batch[0].to(device))
            labels = batch[1].to(device)
            check_labels(out, labels, "taylor")
            nn.functional.cross_entropy(out, labels).backward()
    except DataError:
        model.zero_grad()
        raise
    finally:
        model.train(was)


def _track_removed(
    group, model_names: dict[nn.Module, str], alive: dict[str, list[int]], removed: dict[str, list[int]]
) -> None:
    for dep, idxs in group:
        if dep.pruning_fn == tp.prune_conv_out_channels:
            name = model_names.get(dep.target.module)
            if name is None or name not in alive:
                continue
            drop = set(int(i) for i in idxs)
            removed.setdefault(name, []).extend(alive[name][i] for i in sorted(drop))
            alive[name] = [a for i, a in enumerate(alive[name]) if i not in drop]


def _track_absorbed(
    group, model_names: dict[nn.Module, str], alive: dict[str, list[int]], fits: dict, out: dict
) -> None:
    """Record a group's compensation fits (root's current numbering) under every conv whose
    outputs the group cuts, in that conv's original numbering."""
    for k, (dep, idxs) in enumerate(group):
        if not fits or dep.pruning_fn != tp.prune_conv_out_channels:
            continue
        name = model_names.get(dep.target.module)
        if name is None or name not in alive:
            continue
        local = {int(r): int(i) for i, r in zip(idxs, group[k].root_idxs)}
        orig = alive[name]
        for r, ks in fits.items():
            chans = [local.get(r, r), *(local.get(c, c) for c, _ in ks)]
            if all(c < len(orig) for c in chans):
                out.setdefault(name, {})[orig[chans[0]]] = [(orig[c], w) for c, (_, w) in zip(chans[1:], ks)]


def _importance(
    spec, criterion: str, probe_batches: int, criterion_options: dict | None, compensate: bool, ridge: float
):
    """The criterion's importance object, given the pruning run's ``probe_batches``, ``ridge`` and
    whether it compensates (``residual``: score what compensation leaves) for the options it takes;
    the caller's ``criterion_options`` win."""
    run = {"probe_batches": probe_batches, "residual": compensate, "ridge": ridge}
    options = {k: v for k, v in run.items() if k in spec.options}
    return make_importance(criterion, **{**options, **(criterion_options or {})})


def _ignored_modules(model: nn.Module, ignored_names: list[str], keep_classifier: bool) -> list[nn.Module]:
    """The modules torch-pruning must leave alone: the named ones, and the classifier if kept."""
    named = dict(model.named_modules())
    ignored = [named[n] for n in ignored_names]
    clf = _classifier(model)
    if keep_classifier and clf is not None and clf not in ignored:
        ignored.append(clf)
    return ignored


def _prepare_step(
    model, importance, spec, data, probe_batches: int, compensate: bool, fit, labelled=None
) -> dict:
    """Before a pruning step: refresh data-driven scores on ``data`` (a criterion that reads
    labels: on ``labelled``) and, for Taylor, the loss gradients on ``labelled`` (default
    ``data``; a specialisation's kept-class batches, labels numbered as its restricted head).
    Returns the consumers' inputs on the probe batches of ``fit`` when compensating (else
    ``{}``): ``data`` itself, or the kept classes' images."""
    if hasattr(importance, "refresh"):
        importance.refresh(model, labelled if spec.needs_labels and labelled is not None else data)
    if spec.needs_gradients:
        _taylor_gradients(model, data if labelled is None else labelled, probe_batches)
    if not compensate:
        return {}
    shared = _criterion_inputs(importance, probe_batches) if fit is data else None
    if shared is not None:
        return shared
    consumers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return collect_layer_inputs(model, fit, consumers, max_batches=probe_batches)


def _criterion_inputs(importance, probe_batches: int) -> dict | None:
    """The consumers' inputs that a data-driven criterion has just collected in ``refresh``, when
    they are the rows compensation would collect (every conv and linear, the same number of probe
    batches, the same sampling seed), so that a step reads the probe set once; else ``None``."""
    inner = getattr(importance, "inner", importance)  # KeepClassesImportance wraps the criterion
    inputs = getattr(inner, "inputs", None)
    if not inputs or getattr(inner, "probe_batches", None) != probe_batches:
        return None
    return inputs


class _TargetCheck:
    """Whether the target is reached, asked after every group of a step. The full count
    (``_stats``: a copy of the model counted by torch-pruning) is the judge, but it costs a copy
    per group; the convs' and linears' own MACs and parameters, from their current widths and
    their output sizes (fixed by the input), cost nothing and move with it. Scaled to the full
    count at the start of the step, they skip the full count while the target is clearly (2%)
    out of reach; after a full count that found it not yet reached, they are scaled to that count
    and trusted to within 0.1% (else every group from there on would be counted in full:
    RegNetX-400MF, one step to 2x, 2.4 s -> 22 s)."""

    MARGIN, CALIBRATED = 0.98, 0.999

    def __init__(self, model: nn.Module, example: Tensor) -> None:
        from icnn_compress.measure._layer_latency import layer_io_shapes

        # output positions per sample: all but the batch and the channel (feature) dimension
        shapes = layer_io_shapes(model, example[:1], (nn.Conv2d, nn.Linear))
        self.positions = {m: math.prod(out[1:]) // m.weight.shape[0] for m, (_, out) in shapes.items()}
        self.scale = (1.0, 1.0)
        self.margin = self.MARGIN
        self.counted: tuple[int, int] | None = None  # the last full count, ``(macs, params)``

    def _layers(self) -> tuple[float, float]:
        macs = params = 0.0
        for m, positions in self.positions.items():
            weights = m.weight.numel()  # one multiply-accumulate per weight at every output position
            macs += positions * weights
            params += weights + (m.bias.numel() if m.bias is not None else 0)
        return macs, params

    def start(self, model: nn.Module, counted: tuple[int, int]) -> None:
        """At the start of a step: scale the layers' own counts to the full ``(macs, params)``."""
        self._anchor(counted, self.MARGIN)

    def _anchor(self, counted: tuple[int, int], margin: float) -> None:
        macs, params = self._layers()
        self.scale = (counted[0] / max(macs, 1.0), counted[1] / max(params, 1.0))
        self.margin = margin

    def reached(self, model: nn.Module, target: Target, before: tuple[int, int], example: Tensor) -> bool:
        macs, params = self._layers()
        estimate = (macs * self.scale[0], params * self.scale[1])
        if _reduction(target, before, estimate) < target.value * self.margin:
            return False
        self.counted = counted = _stats(model, example)
        if _reduction(target, before, counted) >= target.value:
            return True
        self._anchor(counted, self.CALIBRATED)
        return False


def _leave_unfollowed_splits(pruner) -> list[nn.Module]:
    """Add to the pruner's ignored layers the convs of every dependency group that maps a channel
    past the end of one of its layers (torch-pruning does not follow some channel splits, such as
    CSP blocks splitting a conv's output in two: pruning those groups fails or corrupts the model).
    Returns the convs so left unpruned."""
    dg, left = pruner.DG, []
    for group in dg.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        if any(_past_the_end(dg, dep, idxs) for dep, idxs in group):
            left += [
                dep.target.module
                for dep, _ in group
                if isinstance(dep.target.module, nn.Conv2d)
                and dg.is_out_channel_pruning_fn(dep.handler)
                and dep.target.module not in left
            ]
    pruner.ignored_layers.extend(left)
    return left


def _past_the_end(dg, dep, idxs) -> bool:
    """Whether a dependency indexes channels that its layer does not have."""
    module = dep.target.module
    if not idxs or not isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
        return False
    size = (
        dg.get_out_channels(module)
        if dg.is_out_channel_pruning_fn(dep.handler)
        else dg.get_in_channels(module)
    )
    return size is not None and max(idxs) >= size


_STEP_ADVICE = (
    "its graph maps a channel past the end of that layer, which happens with channel splits it "
    "does not follow (such as CSP blocks splitting a layer's channels in two); ignore that layer "
    "(ignored_layers) or choose another model"
)


def _step_bound(ratio: float, round_to: int | None, first_widths: dict) -> Callable:
    """``group -> int | None``: the most channels a step of per-layer ranking at channel ratio
    ``ratio`` removes from a group, as torch-pruning counts them (from the group's width when it was
    first scored, rounded to ``round_to``); ``None`` for groups with grouped convs, whose scores are
    averaged over the groups before ranking."""

    def bound(group) -> int | None:
        modules = {dep.target.module for dep, _ in group}
        if any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels for m in modules):
            return None
        n = len(group[0].idxs)
        first = first_widths.setdefault(group[0].dep.source.module, n)
        return max(0, n - int(first * (1 - ratio))) + (round_to - 1 if round_to else 0)

    return bound


def _remove(group, inputs, ridge, compensate, names, alive, removed, absorbed) -> int:
    """Compensate (if asked), record and prune one dependency group; returns the layers compensated."""
    done = 0
    if compensate:
        fits: dict = {}
        done = compensate_group(group, inputs, ridge=ridge, absorbed=fits)
        _track_absorbed(group, names, alive, fits, absorbed)
    _track_removed(group, names, alive, removed)
    group.prune()
    return done


ALLOCATIONS = ("uniform", "latency")


def _width_roots(
    model: nn.Module, widths: dict, max_layer_ratio: float
) -> dict[str, tuple[nn.Module, int, int]]:
    """``{name: (module, channels now, wanted width)}`` for ``prune_model(widths=...)``, validated."""
    if not isinstance(widths, dict) or not widths:
        raise ConfigError(
            f"widths must be a non-empty dict {{layer name: channels}}. Got {widths!r} instead."
        )
    named = dict(model.named_modules())
    out = {}
    for name, width in widths.items():
        module = named.get(name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ConfigError(f"widths: the model has no conv or linear layer named {name!r}.")
        c0 = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        low = max(1, math.ceil(c0 * (1 - max_layer_ratio)))
        if isinstance(width, bool) or not isinstance(width, int) or not low <= width <= c0:
            raise ConfigError(
                f"widths[{name!r}] must be an int in [{low}, {c0}] (at most max_layer_ratio="
                f"{max_layer_ratio:g} of its {c0} channels removed). Got {width!r} instead."
            )
        out[name] = (module, c0, width)
    return out


def _step_group(dg, root: nn.Module, importance, width: int):
    """The dependency group that takes ``root`` down to ``width`` channels, removing those the
    criterion ranks lowest (``None`` when it is already that narrow)."""
    conv = isinstance(root, nn.Conv2d)
    fn = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
    current = root.out_channels if conv else root.out_features
    k = current - width
    if k <= 0:
        return None
    scores = importance(dg.get_pruning_group(root, fn, idxs=list(range(current))))
    if scores is None or len(scores) != current:
        drop = list(range(current - k, current))  # no per-channel score: the last channels go
    else:
        drop = torch.argsort(scores.detach().cpu())[:k].tolist()
    return dg.get_pruning_group(root, fn, idxs=sorted(drop))


def _reduction(target: Target, before: tuple[int, int], after: tuple[int, int]) -> float:
    """The MACs or parameter reduction factor that ``target`` is about; ``(macs, params)`` pairs."""
    i = 0 if target.kind == "macs_reduction" else 1
    return before[i] / max(after[i], 1)


_FINE_STEPS = 12  # extra, smaller steps allowed when closing in on a MACs or params target


def _next_ratio(
    history: list[tuple[float, float]], target: Target, step_ratio: float, max_ratio: float
) -> float | None:
    """The cumulative channel ratio for the next step (shortened on the approach to the target),
    or ``None`` when nothing is left to remove.

    A full step is ``step_ratio`` more. For MACs and parameter targets the step is shortened so as
    not to overshoot: ``log(reduction)`` is close to linear in ``-log(1 - ratio)`` (slope ~2 for
    MACs: both the inputs and the outputs of a layer shrink), so the ratio that meets the target is
    extrapolated from the last two steps (slope 2 before the first).
    """
    r_prev, red_prev = history[-1]
    if r_prev >= max_ratio - 1e-9:
        return None
    full = min(r_prev + step_ratio, max_ratio)
    if target.kind == "latency_speedup":
        return full
    x_prev = -math.log1p(-r_prev)
    slope = 2.0
    if len(history) >= 2:
        r0, red0 = history[-2]
        dx = x_prev + math.log1p(-r0)
        if dx > 1e-9 and red_prev > red0:
            slope = (math.log(red_prev) - math.log(red0)) / dx
    wanted = 1.0 - math.exp(-(x_prev + (math.log(target.value) - math.log(red_prev)) / slope))
    # if the last step removed nothing (rounding to whole channels), take at least a tenth of a step
    stalled = len(history) >= 2 and red_prev <= history[-2][1]
    return min(full, max(wanted, r_prev + (step_ratio / 10 if stalled else 1e-3)))


@torch.enable_grad()  # torch-pruning traces the dependency graph through autograd
def prune_model(
    model: nn.Module,
    example_inputs: Tensor,
    *,
    criterion: str = "l1",
    target: Target | float = 2.0,
    data: DataLoader | None = None,
    compensate: bool = False,
    round_to: int | None = 8,
    max_layer_ratio: float = 0.9,
    global_ranking: bool = False,
    ignored_layers=(),
    keep_classifier: bool = True,
    step_ratio: float = 0.05,
    probe_batches: int = 8,
    bn_batches: int = 20,
    ridge: float = 1e-5,
    criterion_options: dict | None = None,
    keep_classes=None,
    keep_classes_mode: str = "relevance",
    widths: dict[str, int] | None = None,
    allocation: str = "uniform",
    refit_classifier: bool | nn.Module = True,
    inplace: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Remove filters for real until ``target`` is met, in small iterative steps.

    Args:
        model: the network (copied unless ``inplace``).
        example_inputs: ``(1, C, H, W)``: traced by torch-pruning and used to count MACs.
        criterion: a name from ``list_criteria()``: ``icnn-cluster``, ``l1``, ``l2``, ``fpgm``,
            ``taylor``, ``fisher``, ``bn-scale``, ``lamp``, ``random``.
        target: a ``Target``, or a float = MACs reduction factor (2.0 = half the MACs).
        data: probe batches ``(images, labels, ...)``; needed by ``icnn-cluster``, ``taylor``, ``fisher``,
            compensation, BatchNorm re-estimation and refreshed at every step.
        compensate: fold a least-squares reconstruction of each removed channel from the kept
            ones into the consuming layers before removing it.
        round_to: keep the pruned layers' channel counts multiples of this (default 8: widths that
            stay on the fast vectorised kernels, so fewer MACs really run faster: at 2x fewer MACs
            vgg_small ran 1.97x faster in ONNX Runtime, against 1.24x with free widths, ``None``;
            resnet_cifar20 1.69x against 0.86x). A target is then met in
            whole groups of 8 channels: 0-6% past it on the small models and torchvision's
            VGG/MobileNet, 11% on resnet18 at 2x, against 0-3% with ``None``.
        max_layer_ratio: at most this fraction of any layer's channels is removed.
        global_ranking: rank channels across layers (else the same ratio in every layer).
        ignored_layers: names, modules or module types that are never pruned (types expanded).
        keep_classifier: leave the last linear (or last conv) layer's outputs alone.
        step_ratio: the largest channel ratio removed per step (default 0.05, as the recipes; every
            step re-probes the model, so 0.01 took 4x as long on vgg11_bn at 224 px: 100 s against
            25 s); the last steps before a MACs or params target are shortened so as not to
            overshoot it.
        probe_batches: batches probed per step; bn_batches: batches for BatchNorm re-estimation
            after pruning (0: none).
        ridge: regularisation of compensation and cluster residuals.
        criterion_options: passed to the criterion (e.g. ``{"distance_threshold": 0.3}``).
        keep_classes: specialise the model to these class indices: the classifier keeps only
            their outputs (output ``i`` = the ``i``-th smallest kept class), and in every layer the
            filters' scores are weighed by their response to the kept classes over their response
            to all classes on ``data`` (``keep_classes_mode="relevance"``, the default), or the
            filters whose category is outside the kept set go first (``"category"``; it cost up
            to 3.4 points one-shot at 8x in the specialisation benchmark), or the criterion's own
            scores (``"criterion"``; with ``criterion="taylor"`` or ``"fisher"`` the loss is the
            kept classes', through the restricted head). The MACs target counts from
            the unrestricted model. Needs ``data`` of every class; the compensation, the
            BatchNorm re-estimation and the classifier refit read only the kept classes' images
            of it (``kept_class_batches``: up to ``max(bn_batches, probe_batches)`` batches).
        widths: prune exactly these layers to these output widths instead of pursuing ``target``
            (``{layer name: channels}``; each layer is the first conv/linear of its dependency
            group, as in ``PruneResult.removed``; the criterion picks which channels go, in steps of
            at most ``step_ratio``). ``target`` is then not checked, only reported.
        allocation: how many channels each layer gives up. ``"uniform"``: the same ratio
            everywhere (or by ``global_ranking``), in multiples of ``round_to``. ``"latency"``:
            latency-aware widths: each layer's latency is measured in ONNX Runtime against its
            width (``conv_latency_table``, on the provider, threads and batch of ``target``,
            cached per machine) and channels are taken where the latency falls the most for the
            least importance lost, at widths on the fast side of each latency step; the point
            where the target is met is found by bisection on quick copies that are measured (real
            MACs, or ONNX Runtime latency timed against the unpruned model), so a
            ``latency_speedup`` target lands near it (within 5% in 5 of 6 benchmark cases, +10.4%
            in the sixth: README table 2c). Takes a ``macs_reduction`` or ``latency_speedup``
            target. See ``icnn_compress.prune._allocate``.
        refit_classifier: when ``data`` is given, refit the last ``nn.Linear`` at the end (after
            BatchNorm re-estimation) so that its outputs match the unpruned model's on up to
            ``max(bn_batches, probe_batches)`` probe batches (ridge least squares, no training;
            ``refit_classifier``). One-shot top-1 on resnet_cifar20 at 4x fewer MACs went from
            0.66-0.79 to 0.82-0.84 with it (docs/benchmarks.md, table 10). Pass ``False`` when the
            pruned model is fine-tuned next: after 150 distilled steps the refit start ended 0.2
            point lower on average. With ``inplace=True`` a copy of the unpruned model is kept
            until then. A module instead of ``True``: refit to *its* outputs (same classes as
            ``model``), e.g. the model a fine-tune with the filter loss started from: that lifted
            the loss model's one-shot top-1 by 0.26-0.41 point on resnet_cifar20 and 0.05-0.24 on
            vgg_small (docs/benchmarks.md, table 10d).

    Returns:
        ``PruneResult``. Raises ``TargetError`` when the target cannot be met within
        ``max_layer_ratio`` and the ignored layers.

    Example:
        >>> res = prune_model(model, torch.rand(1, 1, 28, 28), criterion="l1", target=2.0)
        >>> res.macs_reduction  # ~2.0
    """
    target = as_target(target)
    data = as_batches(data)
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {ALLOCATIONS}. Got {allocation!r} instead.")
    if allocation == "latency" and widths is None:
        from icnn_compress.prune._allocate import prune_latency_aware

        return prune_latency_aware(
            model,
            example_inputs,
            criterion=criterion,
            target=target,
            data=data,
            compensate=compensate,
            max_layer_ratio=max_layer_ratio,
            ignored_layers=ignored_layers,
            keep_classifier=keep_classifier,
            step_ratio=step_ratio,
            probe_batches=probe_batches,
            bn_batches=bn_batches,
            ridge=ridge,
            criterion_options=criterion_options,
            keep_classes=keep_classes,
            keep_classes_mode=keep_classes_mode,
            refit_classifier=refit_classifier,
            inplace=inplace,
            progress=progress,
        )
    if not 0 < max_layer_ratio < 1:
        raise ConfigError(f"max_layer_ratio must be in (0, 1). Got {max_layer_ratio!r} instead.")
    if not 0 < step_ratio <= max_layer_ratio:
        raise ConfigError(f"step_ratio must be in (0, max_layer_ratio]. Got {step_ratio!r} instead.")
    spec = criterion_spec(criterion)
    needs_data = spec.needs_data or compensate or keep_classes is not None
    if needs_data and data is None:
        what = (
            f"criterion {criterion!r}"
            if spec.needs_data
            else "compensate=True"
            if compensate
            else "keep_classes"
        )
        raise ConfigError(f"{what} needs data= (a DataLoader of probe batches).")
    importance = _importance(spec, criterion, probe_batches, criterion_options, compensate, ridge)
    # modules of the caller's model are matched by name before the copy, so they keep meaning
    ignored_names = ignored_module_names(model, ignored_layers)
    # the unpruned model whose classifier outputs the pruned one's are refit to: the caller's
    # model, untouched unless inplace
    teacher = None
    if refit_classifier is not False and data is not None and _refit.last_linear_name(model) is not None:
        if isinstance(refit_classifier, nn.Module):
            teacher = refit_classifier
        else:
            teacher = copy.deepcopy(model) if inplace else model
    model = model if inplace else copy.deepcopy(model)
    device = next(model.parameters()).device
    example_inputs = example_inputs.to(device)
    ignored = _ignored_modules(model, ignored_names, keep_classifier)
    clf = _classifier(model)
    fit = data  # what the pruned model is fitted to: the probe, or the kept classes' images of it
    labelled = None  # what taylor and fisher take their loss on, when not ``data``
    if keep_classes is not None:
        keep_classes = check_keep_classes(keep_classes, clf)
        # the class responses weigh the scores in every mode but 'criterion' (a probe pass saved there)
        responses = {} if keep_classes_mode == "criterion" else class_responses(model, data, probe_batches)
        importance = KeepClassesImportance(importance, responses, keep_classes, keep_classes_mode)
        # the specialised model is fitted to the kept classes' images: compensation, BatchNorm
        # statistics and the classifier refit (the ranking reads every class)
        fit = kept_class_batches(data, keep_classes, max(bn_batches, probe_batches))
        if spec.needs_gradients or spec.needs_labels:  # the loss goes through the restricted head
            renumber = torch.full((clf.out_features,), -1, dtype=torch.long)
            renumber[keep_classes] = torch.arange(len(keep_classes))
            labelled = [(x, renumber[y.cpu()].to(y.device)) for x, y in fit]
    macs0, params0 = _stats(model, example_inputs)
    # the unpruned model is exported now and timed again beside every candidate
    timer = _speedup_timer(model, example_inputs, target) if target.kind == "latency_speedup" else None
    steps_max = max(1, int(math.ceil(max_layer_ratio / step_ratio)))
    # the per-step channel ratios are chosen as we go (see _next_ratio), so the list is only storage
    pruner = _dependency_graph(
        lambda: tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=importance,
            pruning_ratio=max_layer_ratio,
            iterative_steps=steps_max + _FINE_STEPS,
            iterative_pruning_ratio_scheduler=lambda ratio, steps: [0.0] * (steps + 1),
            global_pruning=global_ranking,
            ignored_layers=ignored,
            round_to=round_to,
            max_pruning_ratio=max_layer_ratio,
        ),
        model,
    )
    names = {m: n for n, m in model.named_modules()}
    unfollowed = _leave_unfollowed_splits(pruner)
    if unfollowed:
        _log.warning(
            "%d layers are left unpruned: torch-pruning does not follow the channel split after them "
            "(as in CSP blocks): %s",
            len(unfollowed),
            ", ".join(names[m] for m in unfollowed[:8]) + (" ..." if len(unfollowed) > 8 else ""),
        )
    alive = {n: list(range(m.out_channels)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if hasattr(importance, "bind"):  # criteria that follow channels by their original numbers
        importance.bind(names, alive)
    if keep_classes is not None:
        dropped = [i for i in range(clf.out_features) if i not in set(keep_classes)]
        if dropped:  # recorded in the pruner's history, so load_pruned rebuilds the smaller head
            pruner.DG.get_pruning_group(clf, tp.prune_linear_out_channels, idxs=dropped).prune()
    removed: dict[str, list[int]] = {}
    absorbed: dict[str, dict[int, list]] = {}
    reached, macs, params, step, compensated, speedup = False, macs0, params0, 0, 0, None
    if widths is not None:
        roots = _width_roots(model, widths, max_layer_ratio)
        steps = max(1, max(math.ceil((1 - w / c0) / step_ratio - 1e-9) for _, c0, w in roots.values()))
        bar = progress_bar(total=steps, progress=progress, desc=f"prune {criterion}", leave=False)
        for step in range(1, steps + 1):
            inputs = _prepare_step(model, importance, spec, data, probe_batches, compensate, fit, labelled)
            with _torch_pruning_errors(model, "rank and remove the channels of", _STEP_ADVICE):
                for root, c0, width in roots.values():
                    group = _step_group(
                        pruner.DG, root, importance, c0 - math.floor((c0 - width) * step / steps)
                    )
                    if group is not None:
                        compensated += _remove(
                            group, inputs, ridge, compensate, names, alive, removed, absorbed
                        )
            bar.update(1)
        bar.close()
        macs, params = _stats(model, example_inputs)
        if target.kind == "latency_speedup":
            speedup = timer.speedup(model)
        reached = True
    history = [(0.0, 1.0)]  # (channel ratio, reduction reached)
    check = None  # the target check after every group, built on the first step
    # check the target after every group and stop there: all layers' widths move in whole
    # channels (in steps of round_to) at once, so a step, shortened on the approach or not,
    # can jump past it (densenet121, 32-wide layers: 1.74x -> 2.60x in one step for 2x)
    watch = target.kind != "latency_speedup"
    first_widths: dict = {}  # group root -> its width when first scored (torch-pruning's reference)
    loop_steps = 0 if widths is not None else steps_max + _FINE_STEPS  # widths: done above
    bar = progress_bar(
        total=loop_steps and steps_max, progress=progress, desc=f"prune {criterion}", leave=False
    )
    for step in range(1, loop_steps + 1):
        ratio = _next_ratio(history, target, step_ratio, max_layer_ratio)
        if ratio is None:
            break
        pruner.per_step_pruning_ratio[step] = ratio
        if hasattr(importance, "step_bound") and not global_ranking:
            importance.step_bound = _step_bound(ratio, round_to, first_widths)
        inputs = _prepare_step(model, importance, spec, data, probe_batches, compensate, fit, labelled)
        if watch:
            check = check or _TargetCheck(model, example_inputs)
            check.start(model, (macs, params))
        # groups come one at a time: each is built on the model as the ones before it left it
        counted = None  # the full count that found the target met, reused below
        with _torch_pruning_errors(model, "rank and remove the channels of", _STEP_ADVICE):
            for group in pruner.step(interactive=True):
                compensated += _remove(group, inputs, ridge, compensate, names, alive, removed, absorbed)
                if watch and check.reached(model, target, (macs0, params0), example_inputs):
                    counted = check.counted
                    break
        macs, params = counted or _stats(model, example_inputs)
        bar.update(1)
        bar.set_postfix(macs=f"{macs0 / max(macs, 1):.2f}x")
        if target.kind == "latency_speedup":
            speedup = achieved = timer.speedup(model)
        else:
            achieved = _reduction(target, (macs0, params0), (macs, params))
        history.append((ratio, achieved))
        reached = achieved >= target.value
        if reached:
            break
    bar.close()
    model.zero_grad(set_to_none=True)
    if data is not None and bn_batches > 0:
        reestimate_batchnorm(model, fit, max_batches=bn_batches)
    if not reached:
        achieved = {
            "macs_reduction": macs0 / max(macs, 1),
            "params_reduction": params0 / max(params, 1),
            "latency_speedup": speedup,
        }[target.kind]
        raise TargetError(
            f"Target {target.kind}={target.value:g} cannot be met: reached {achieved:.3g} after removing up "
            f"to max_layer_ratio={max_layer_ratio:g} of every prunable layer (ignored: {len(ignored)} "
            "layers). Raise max_layer_ratio, ignore fewer layers, or lower the target."
        )
    inputs = check = None  # the last step's probe activations: freed, and handed back to the OS
    refit = teacher is not None and _refit.refit_classifier(
        model, teacher, fit, max_batches=max(bn_batches, probe_batches), classes=keep_classes
    )
    teacher = None
    release_freed_memory()
    return PruneResult(
        model,
        criterion,
        target,
        macs0,
        macs,
        params0,
        params,
        removed,
        list(pruner.pruning_history()),
        step,
        speedup,
        compensated,
        keep_classes,
        absorbed,
        refit,
    )


@torch.enable_grad()
def prune_filters(
    model: nn.Module,
    example_inputs: Tensor,
    layer: str,
    indices,
    *,
    compensate: bool = False,
    data: DataLoader | None = None,
    probe_batches: int = 8,
    ridge: float = 1e-5,
    inplace: bool = True,
) -> PruneResult:
    """Remove exactly the output channels ``indices`` of conv layer ``layer`` (and everything
    coupled to them), validating what torch-pruning does not.

    Raises ``ConfigError`` for an unknown or non-conv layer, and for indices that are empty,
    duplicated, out of range, not integers, or all the channels of the layer.
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ConfigError(f"The model has no module named {layer!r}.")
    conv = modules[layer]
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"prune_filters needs a Conv2d layer; {layer!r} is a {type(conv).__name__}.")
    if torch.is_tensor(indices) or isinstance(indices, np.ndarray):
        indices = indices.tolist()
    if isinstance(indices, (int, np.integer)):
        indices = [indices]
    idx = [int(i) if isinstance(i, np.integer) else i for i in indices]
    if not idx:
        raise ConfigError(f"indices for {layer!r} is empty: give at least one channel to remove.")
    if any(not isinstance(i, int) or isinstance(i, bool) for i in idx):
        raise ConfigError(f"indices must be integers. Got {idx!r}.")
    dups = sorted({i for i in idx if idx.count(i) > 1})
    if dups:
        raise ConfigError(f"indices for {layer!r} has duplicates: {dups}.")
    bad = [i for i in idx if not 0 <= i < conv.out_channels]
    if bad:
        raise ConfigError(
            f"indices {bad} are out of range for {layer!r} with {conv.out_channels} channels "
            f"(allowed 0..{conv.out_channels - 1})."
        )
    if len(idx) == conv.out_channels:
        raise ConfigError(
            f"indices would remove all {conv.out_channels} channels of {layer!r}; keep at least one."
        )
    if compensate and data is None:
        raise ConfigError("compensate=True needs data= (a DataLoader of probe batches).")
    model = model if inplace else copy.deepcopy(model)
    conv = dict(model.named_modules())[layer]
    device = next(model.parameters()).device
    example_inputs = example_inputs.to(device)
    macs0, params0 = _stats(model, example_inputs)
    graph = _dependency_graph(
        lambda: tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs), model
    )
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=sorted(idx))
    if not graph.check_pruning_group(group):
        raise IcnnCompressError(
            f"torch-pruning refused to prune {sorted(idx)} of {layer!r} (a coupled layer would "
            "lose all its channels)."
        )
    compensated, fits = 0, {}
    if compensate:
        consumers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        inputs = collect_layer_inputs(model, data, consumers, max_batches=probe_batches)
        compensated = compensate_group(group, inputs, ridge=ridge, absorbed=fits)
    group.prune()
    macs, params = _stats(model, example_inputs)
    return PruneResult(
        model,
        "manual",
        None,
        macs0,
        macs,
        params0,
        params,
        {layer: sorted(idx)},
        list(graph.pruning_history()),
        1,
        None,
        compensated,
        None,
        {layer: {int(r): ks for r, ks in fits.items()}} if fits else {},
    )
