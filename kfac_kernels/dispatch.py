"""Backend registry and dispatch for kfac_kernels ops.

Each op registers one implementation per backend ("torch", "triton", "native"). `resolve` picks one:

1. an explicit ``backend=`` argument, else
2. the environment variable ``KFAC_KERNELS_BACKEND`` (torch|triton|native), else
3. by device: CUDA tensors go to "triton" when it is registered and importable, everything else to "torch".

The registry is the package's only global state.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("torch", "triton", "native")
ENV_VAR = "KFAC_KERNELS_BACKEND"

_REGISTRY: Dict[str, Dict[str, Callable]] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco


def available(op: str) -> tuple:
    """Backends registered for ``op``."""
    return tuple(_REGISTRY.get(op, {}))


def _default_backend(device: torch.device) -> str:
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not one of {BACKENDS}")
        return forced
    if device.type == "cuda":
        return "triton"
    return "torch"


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> Callable:
    """Return the implementation of ``op`` for tensors on ``device``."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no op named {op!r} is registered")
    explicit = backend is not None or bool(os.environ.get(ENV_VAR))
    name = backend if backend is not None else _default_backend(device)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name in impls:
        return impls[name]
    if explicit:
        raise RuntimeError(
            f"op {op!r} has no {name!r} backend here (registered: {sorted(impls)}); "
            f"install triton / build the native extension, or choose another backend"
        )
    return impls["torch"]
