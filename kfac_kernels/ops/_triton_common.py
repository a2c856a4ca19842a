"""Launch helpers shared by the Triton kernels in the op files (imported only where ``HAS_TRITON``).

* ``fp32_precision``: how ``tl.dot`` treats float32 operands. The interpreter computes in numpy, where only "ieee"
  is meaningful; on a GPU the default is "tf32x3" (three TF32 products, float32-level error on the tensor cores).
  ``KFAC_TRITON_FP32_PRECISION=ieee|tf32x3|tf32`` overrides it.
* ``kernel_dtype``: the operand dtype a kernel streams: the inputs' common half dtype when they share one, else
  float32 (float64 inputs never reach a kernel: the launchers hand them to the torch reference).
"""
from __future__ import annotations

import os

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


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


def num_programs_target(device: torch.device) -> int:
    """About two waves of programs on the device (a small number in the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_count(work_items: int, programs: int, max_split: int) -> int:
    """How many ways to split a reduction so that ``work_items * split`` reaches ``programs``."""
    want = -(-programs // max(1, work_items))
    return max(1, min(want, max_split))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
