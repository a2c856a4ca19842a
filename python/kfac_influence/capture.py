"""Which layers are tracked, and capture of their inputs a and output gradients g.

Tracked: every ``nn.Linear`` and ``nn.Conv2d`` (subclasses included: diffusers attention projections and
time-embedding MLPs are plain Linear) with ``groups == 1``, selected by fnmatch name patterns.
Weight and bias form one matrix (d_out, d_in + has_bias): conv weights flatten as ``weight.flatten(1)``.

Per row (draw) and position r: Linear inputs ``(n, *, d_in)`` give ``a: (n, R, d_in)`` with R the product of the
middle dimensions (tokens); Conv2d gives patches (n, R = H_out * W_out, C_in*kh*kw). A module called several times
in one forward (weight sharing, sampling trajectories) contributes each call's positions.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_kernels as kk


@dataclass(frozen=True)
class LayerSpec:
    """Shape facts of one tracked layer. ``d_in`` excludes the bias coordinate."""
    name: str
    kind: str  # "linear" | "conv2d"
    d_in: int
    d_out: int
    has_bias: bool
    kernel_size: Tuple[int, int] = (1, 1)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)

    @property
    def d_in_total(self) -> int:
        return self.d_in + int(self.has_bias)

    @property
    def grad_shape(self) -> Tuple[int, int]:
        return (self.d_out, self.d_in_total)


def _conv_padding(m: nn.Conv2d) -> Tuple[int, int]:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        total = [m.dilation[i] * (m.kernel_size[i] - 1) for i in range(2)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even effective kernel is not supported")
        return (total[0] // 2, total[1] // 2)
    return tuple(m.padding)


def layer_spec(name: str, m: nn.Module) -> LayerSpec:
    if isinstance(m, nn.Linear):
        return LayerSpec(name, "linear", m.in_features, m.out_features, m.bias is not None)
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise ValueError(f"layer {name!r}: grouped convolutions (groups={m.groups}) are not supported")
        kh, kw = m.kernel_size
        pad = (0, 0) if m.padding_mode != "zeros" else _conv_padding(m)
        return LayerSpec(name, "conv2d", m.in_channels * kh * kw, m.out_channels, m.bias is not None,
                         (kh, kw), tuple(m.stride), pad, tuple(m.dilation))
    raise TypeError(f"layer {name!r} is a {type(m).__name__}; only Linear and Conv2d are tracked")


def select_layers(model: nn.Module, patterns: Optional[Sequence[str]] = None,
                  exclude: Sequence[str] = ()) -> Dict[str, nn.Module]:
    """Tracked modules by name, in module order. ``patterns``: fnmatch patterns (None = all)."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        out[name] = m
    if not out:
        raise ValueError(f"no Linear/Conv2d layer matches patterns={list(patterns) if patterns else None}, "
                         f"exclude={list(exclude)}")
    return out


def check_finite(name: str, what: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"layer {name!r}: {what} contain NaN or inf")


class _Output:
    """What a capture keeps of a layer output: its shape and dtype (holding the tensor would keep every layer's
    output alive until the backward pass)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype = t.shape, t.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


class _Stream:
    """One backward pass: output gradients arriving in tensor hooks, handed on a layer at a time once all of the
    layer's calls have theirs."""

    def __init__(self, records, on_layer):
        self.records, self.on_layer, self.pending, self.done = records, on_layer, {}, set()

    def arrive(self, name: str, i: int, grad: torch.Tensor) -> None:
        got = self.pending.setdefault(name, {})
        got[i] = grad
        if len(got) == len(self.records[name]):
            self.finish(name)

    def finish(self, name: str) -> None:
        got = self.pending.pop(name, {})
        calls = [(x, got[i] if i in got else torch.zeros(out.shape, dtype=out.dtype, device=x.device))
                 for x, out, i in self.records[name]]
        self.done.add(name)
        self.on_layer(name, calls)


class LayerCapture:
    """Context manager recording, for each tracked module and each call in one forward, its input, and making
    its output gradient available a layer at a time during the backward pass.

    Inputs are stored detached (padded first for non-zero padding modes). Each output ``y`` is returned as
    ``y + z`` with ``z`` a zero scalar leaf, and carries a tensor hook: backpropagating to the leaves
    (``gradients``) visits every tracked output, computes no weight gradient, and hands each layer's
    ``(input, grad_output)`` calls to a callback as soon as they exist, so no output and no output gradient has
    to outlive its layer's processing. The hook sits on the node of ``y + z``, so a later in-place change of
    the output does not change the gradient it sees. With ``diagnose`` set, the forward hook instead checks each
    call's input and output for NaN/inf and raises naming the first layer (``engine.forward_capture`` reruns a
    non-finite forward that way).
    """

    def __init__(self, modules: Dict[str, nn.Module]):
        self.modules = modules
        self.specs = {n: layer_spec(n, m) for n, m in modules.items()}
        self.records: Dict[str, List[Tuple[torch.Tensor, _Output, int]]] = {}
        self._leaves: List[torch.Tensor] = []
        self._stream: Optional[_Stream] = None
        self._handles = []
        self.forward_count = 0  # forwards entered: a backward must belong to the latest
        self.diagnose = False

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return None
            x = inputs[0]
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            if self.diagnose:
                check_finite(name, "activations (layer inputs)", x)
                check_finite(name, "layer outputs", output)
            calls = self.records.setdefault(name, [])
            i = len(calls)
            z = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            y = output + z
            y.register_hook(self._grad_hook(name, i))
            calls.append((x.detach(), _Output(y), i))
            self._leaves.append(z)
            return y
        return hook

    def _grad_hook(self, name: str, i: int):
        def hook(grad):
            if self._stream is not None:
                self._stream.arrive(name, i, grad)
        return hook

    def __enter__(self) -> "LayerCapture":
        self.reset()
        self.forward_count += 1
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        self.records = {}
        self._leaves = []

    def gradients(self, f: torch.Tensor, v: torch.Tensor, retain_graph: bool,
                  on_layer: Optional[Callable[[str, List], None]] = None) -> Optional[Dict[str, List]]:
        """Backpropagate ``v`` through ``f``. With ``on_layer``, call ``on_layer(name, [(input, grad_output) per
        call])`` for each layer during the backward pass (layers the gradient does not reach get zeros, after
        it) and return None; without, return those lists as a dict in recording order. An exception in
        ``on_layer`` ends the backward pass after the layers already handed on: callers keep no partial sums
        (the passes restart a failed group from their last checkpoint)."""
        result: Dict[str, List] = {}
        self._stream = _Stream(self.records, on_layer or result.__setitem__)
        try:
            if self._leaves:
                torch.autograd.grad(f, self._leaves, v, retain_graph=retain_graph, allow_unused=True)
            for name in self.records:
                if name not in self._stream.done:
                    self._stream.finish(name)
        finally:
            self._stream = None
        return None if on_layer is not None else {name: result[name] for name in self.records}


def inputs_as_rows(spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """Layer input of one call -> ``a: (n, R, d_in)`` (conv: unfolded patches)."""
    if spec.kind == "conv2d":
        return kk.unfold_conv_input(x, spec.kernel_size, spec.stride, spec.padding, spec.dilation)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def grads_as_rows(spec: LayerSpec, g: torch.Tensor) -> torch.Tensor:
    """Output gradient of one call -> ``g: (n, R, d_out)``."""
    if spec.kind == "conv2d":
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def calls_as_rows(spec: LayerSpec, calls: List[Tuple[torch.Tensor, torch.Tensor]], *,
                  patches: bool = False) -> Tuple[Union[torch.Tensor, kk.ConvPatches], torch.Tensor]:
    """All calls of one layer -> (a, g) with positions of every call concatenated: (n, R_total, d).

    With ``patches`` a conv layer called once gives ``a`` as ``kk.ConvPatches`` (no im2col): for the ops, which
    accept it in place of the unfolded rows."""
    if patches and spec.kind == "conv2d" and len(calls) == 1:
        x, gr = calls[0]
        return (kk.ConvPatches(x, spec.kernel_size, spec.stride, spec.padding, spec.dilation),
                grads_as_rows(spec, gr))
    return (joined_rows([inputs_as_rows(spec, x) for x, _ in calls]),
            joined_rows([grads_as_rows(spec, gr) for _, gr in calls]))


def rounded_calls(calls: List[Tuple[torch.Tensor, torch.Tensor]],
                  dtype: Optional[torch.dtype]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """A layer's (input, grad_output) calls with both rounded to ``dtype`` (None: unchanged): the operands of a
    reduced-precision pass."""
    return calls if dtype is None else [(x.to(dtype), g.to(dtype)) for x, g in calls]


def joined_rows(rows: List[torch.Tensor]) -> torch.Tensor:
    """The rows ``(n, R_i, d)`` of a layer's calls as one ``(n, sum R_i, d)`` (no copy for a single call)."""
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
