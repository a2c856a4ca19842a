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
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

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


class LayerCapture:
    """Context manager recording, for each tracked module and each call in one forward, its (input, output).

    Inputs are stored detached (padded first for non-zero padding modes); outputs keep their graph so that
    ``torch.autograd.grad(f, capture.outputs(), v)`` gives the output gradients without computing any weight
    gradient.
    """

    def __init__(self, modules: Dict[str, nn.Module]):
        self.modules = modules
        self.specs = {n: layer_spec(n, m) for n, m in modules.items()}
        self.records: Dict[str, List[Tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self._handles = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            if output.requires_grad:
                self.records.setdefault(name, []).append((x.detach(), output, output._version))
        return hook

    def __enter__(self) -> "LayerCapture":
        self.records = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        self.records = {}

    def outputs(self) -> Tuple[List[Tuple[str, int]], List[torch.Tensor]]:
        """(keys, tensors): keys are (layer name, call index), tensors the recorded outputs."""
        keys, outs = [], []
        for name, calls in self.records.items():
            for i, (_, out, version) in enumerate(calls):
                if out._version != version:
                    raise RuntimeError(f"layer {name!r}: its output was modified in place after the forward; "
                                       "output gradients cannot be captured")
                keys.append((name, i))
                outs.append(out)
        return keys, outs

    def gradients(self, f: torch.Tensor, v: torch.Tensor, retain_graph: bool) -> Dict[str, List]:
        """Backpropagate ``v`` through ``f``; return, per layer, a list of (input, grad_output) per call."""
        keys, outs = self.outputs()
        grads = torch.autograd.grad(f, outs, v, retain_graph=retain_graph, allow_unused=True)
        result: Dict[str, List] = {}
        for (name, i), gr in zip(keys, grads):
            x = self.records[name][i][0]
            if gr is None:
                gr = torch.zeros_like(self.records[name][i][1])
            result.setdefault(name, []).append((x, gr))
        return result


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
    a = [inputs_as_rows(spec, x) for x, _ in calls]
    g = [grads_as_rows(spec, gr) for _, gr in calls]
    if len(calls) == 1:
        return a[0], g[0]
    return torch.cat(a, dim=1), torch.cat(g, dim=1)
