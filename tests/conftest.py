"""Test configuration. Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection start."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# diffusers creates its stderr log handler on first use, bound to whatever sys.stderr is then: created inside a test
# that captures output (capsys), it would later write to that test's closed buffer and print "--- Logging error
# ---" with a traceback into another test's output. Created here, it writes to the session's stream.
from diffusers.utils import logging as _diffusers_logging  # noqa: E402

_diffusers_logging.get_logger("diffusers")

# KFAC_TEST_THREADS=1 when several test runs share the machine (oversubscribed OpenMP threads spin: up to 20x slower)
torch.set_num_threads(int(os.environ.get("KFAC_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast, and far faster on a loaded machine (no OpenMP spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
