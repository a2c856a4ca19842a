"""Optional Triton import: ``HAS_TRITON`` is False where triton is missing; op files then register torch only."""
try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False
