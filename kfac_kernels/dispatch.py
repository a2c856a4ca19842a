"""Backend registry and dispatch for kfac_kernels ops.

Each op registers one implementation per backend ("torch", "triton"). `resolve` picks one:

1. an explicit ``backend=`` argument, else
2. the environment variable ``KFAC_KERNELS_BACKEND`` (torch|triton), else
3. by device: CUDA tensors go to "triton" when it is registered and importable, everything else to "torch".

When the choice is the device default (3) and it is "triton", the caller gets ``guarded(op, device)``: the Triton
implementation run under a guard. If it raises (a kernel that does not compile for the device, runs out of shared
memory or registers, an architecture the kernels are not built for such as sm_75 or ROCm, any error in a launch),
the guard runs the torch implementation on the same arguments; if that succeeds, the failure was the kernel's: the
guard warns once (naming the op, the device and the reason) and remembers, for the rest of the process, that
this op on this device takes the torch path. If the torch implementation fails too, the error is the caller's
(bad shapes, dtypes, devices) and the torch error is raised, nothing remembered. An explicit backend (1, 2) is
never guarded: ``backend="triton"`` or ``KFAC_KERNELS_BACKEND=triton`` raises the kernel's error.

Why the key is (op, device), not (op, shape): every way a kernel fails on a device is a property of the kernel
and the device (an architecture, a toolchain, a shared-memory limit the launchers' configurations missed), not
of one call, and retrying each new shape would pay a failed compilation (seconds) per layer and warn per layer.
Safe to rerun: the Triton implementations touch ``out`` only after all their launches succeeded.

The registry and the fallback record are the package's only global state (``reset_fallbacks`` clears the latter).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("torch", "triton")
ENV_VAR = "KFAC_KERNELS_BACKEND"

_REGISTRY: Dict[str, Dict[str, Callable]] = {}
_FALLBACKS: Dict[Tuple[str, str], str] = {}  # (op, device) -> reason the Triton path failed there


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed on this device; the op runs its torch implementation from now on."""


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


def fallbacks() -> Dict[Tuple[str, str], str]:
    """(op, device) pairs that fell back to torch in this process, with the reason."""
    return dict(_FALLBACKS)


def reset_fallbacks() -> None:
    _FALLBACKS.clear()


def _default_backend(device: torch.device) -> str:
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not one of {BACKENDS}")
        return forced
    if device.type == "cuda":
        return "triton"
    return "torch"


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def guarded(op: str, device: torch.device) -> Callable:
    """The Triton implementation of ``op`` with the torch fallback described in the module docstring."""
    impls = _REGISTRY[op]
    key = (op, _device_key(device))
    if key in _FALLBACKS:
        return impls["torch"]
    triton_fn, torch_fn = impls["triton"], impls["torch"]

    @functools.wraps(triton_fn)
    def run(*args, **kwargs):
        if key in _FALLBACKS:
            return torch_fn(*args, **kwargs)
        try:
            return triton_fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any kernel failure; the torch path decides whose error it was
            result = torch_fn(*args, **kwargs)  # raises the caller's error if the arguments are bad
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
            _FALLBACKS[key] = reason
            warnings.warn(f"kfac_kernels: the Triton kernel of {op!r} failed on {key[1]} ({reason}); {op!r} runs "
                          f"its torch implementation there for the rest of this process. Set {ENV_VAR}=triton "
                          f"to raise instead.", KernelFallbackWarning, stacklevel=2)
            return result

    return run


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
        if name == "triton" and not explicit and "torch" in impls:
            return guarded(op, device)
        return impls[name]
    if explicit:
        raise RuntimeError(
            f"op {op!r} has no {name!r} backend here (registered: {sorted(impls)}); "
            f"install triton, or choose another backend"
        )
    return impls["torch"]
