"""Launch helpers shared by the Triton kernels in the op files (imported only where ``HAS_TRITON``).

* ``fp32_precision``: how ``tl.dot`` treats float32 operands. The interpreter computes in numpy, where only "ieee"
  is meaningful; on a GPU the default is "tf32x3" (three TF32 products, float32-level error on the tensor cores).
  ``KFAC_TRITON_FP32_PRECISION=ieee|tf32x3|tf32`` overrides it.
* ``kernel_dtype``: the operand dtype a kernel streams: the inputs' common half dtype when they share one, else
  float32 (float64 inputs never reach a kernel: the launchers hand them to the torch reference).
* ``Target`` / ``device_target``: what a launcher's configuration choice depends on besides shapes and dtypes:
  the compute capability, the per-block shared-memory limit (opt-in maximum) and the SM count. Every launcher picks
  its configuration with a pure function of (shapes, dtype, target), so that ``bench/compile_check.py`` can compile,
  ahead of time and on a CPU, exactly what a launcher would launch on each GPU (it sets ``target_override`` and
  records the launches with ``recording`` instead of running them).
* ``launch``: the one place kernels are launched (or recorded).
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)

# Per-block shared memory a kernel may opt into, by compute capability (CUDA C++ Programming Guide, "Compute
# Capabilities": 8.0 / 8.7: 163 KB; 8.6 / 8.9: 99 KB; 9.0: 227 KB). Used where the driver cannot be asked.
SMEM_OPTIN = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
MIN_CAPABILITY = 80  # bf16 tl.dot and the tuned tile shapes assume Ampere or newer


class Target(NamedTuple):
    """A CUDA device as the launchers see it. ``capability``: 10 * major + minor (86 for sm_86)."""
    capability: int
    smem: int
    sms: int = 132

    @classmethod
    def of(cls, capability: int, sms: int = 132) -> "Target":
        return cls(capability, SMEM_OPTIN.get(capability, SMEM_OPTIN[80] if capability < 86 else SMEM_OPTIN[90]),
                   sms)


class UnsupportedTarget(RuntimeError):
    """The device is not one the kernels are built for (pre-Ampere NVIDIA, ROCm): the dispatcher falls back."""


_OVERRIDE: list = []
_RECORD: list = []
_TARGETS: dict = {}


@contextlib.contextmanager
def target_override(target: Target):
    """Launchers see ``target`` whatever the tensors' device (for bench/compile_check.py and tests)."""
    _OVERRIDE.append(target)
    try:
        yield target
    finally:
        _OVERRIDE.pop()


@contextlib.contextmanager
def recording():
    """Launches are appended to the yielded list as ``(kernel, grid, args, kwargs)`` instead of being run."""
    calls: list = []
    _RECORD.append(calls)
    try:
        yield calls
    finally:
        _RECORD.pop()


def device_target(device: torch.device) -> Optional[Target]:
    """The launch target of ``device``: None for the interpreter (CPU tensors), else the CUDA device's capability,
    opt-in shared-memory limit (from Triton's driver, else the table) and SM count. Raises ``UnsupportedTarget``
    for devices the kernels are not built for."""
    if _OVERRIDE:
        return _OVERRIDE[-1]
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TARGETS:
        if getattr(torch.version, "hip", None):
            raise UnsupportedTarget("ROCm devices are not a target of these kernels")
        props = torch.cuda.get_device_properties(index)
        cap = 10 * props.major + props.minor
        if cap < MIN_CAPABILITY:
            raise UnsupportedTarget(f"sm_{cap} is older than sm_{MIN_CAPABILITY}")
        smem = Target.of(cap).smem
        try:
            from triton.runtime import driver
            smem = int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
        except Exception:  # noqa: BLE001 - keep the table's value
            pass
        _TARGETS[index] = Target(cap, smem, props.multi_processor_count)
    return _TARGETS[index]


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or recorded under ``recording()``."""
    if _RECORD:
        _RECORD[-1].append((kernel, tuple(grid), args, kwargs))
        return
    kernel[tuple(grid)](*args, **kwargs)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp32_precision() -> str:
    if interpreting():
        return "ieee"
    return os.environ.get("KFAC_TRITON_FP32_PRECISION", "tf32x3")


def kernel_dtype(*ts: torch.Tensor) -> torch.dtype:
    dtypes = {t.dtype for t in ts}
    if len(dtypes) == 1 and next(iter(dtypes)) in LOW_PRECISION:
        return next(iter(dtypes))
    return torch.float32


def any_float64(*ts) -> bool:
    return any(getattr(t, "dtype", None) == torch.float64 for t in ts)  # tensors and ConvPatches


def num_programs_target(target: Optional[Target]) -> int:
    """About two waves of programs on the device (a small number in the interpreter)."""
    return 2 * target.sms if target is not None else 4


def split_count(work_items: int, programs: int, max_split: int) -> int:
    """How many ways to split a reduction so that ``work_items * split`` reaches ``programs``."""
    want = -(-programs // max(1, work_items))
    return max(1, min(want, max_split))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pick(candidates, target: Target, smem_estimate):
    """The first candidate configuration whose estimated shared memory fits the target's per-block limit (the
    last one if none does: compile_check then reports it)."""
    for c in candidates:
        if smem_estimate(c) <= target.smem:
            return c
    return candidates[-1]
