"""Triton eigenbasis preconditioning against the float64 reference (interpreter)."""
import pytest
import torch

from kernel_check import DTYPES, assert_flash_rule, lowp_precondition, orthogonal, randn, requires_triton
from kfac_kernels.ops import precondition as pc

pytestmark = requires_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 13, 19), (1, 21, 5)])
@pytest.mark.parametrize("damping", [0.1, "tensor"])
def test_precondition(dtype, shape, damping):
    gen = torch.Generator().manual_seed(20)
    nq, d_out, d_in = shape
    v = randn(nq, d_out, d_in, dtype=dtype, gen=gen)
    qa, qg = orthogonal(d_in, dtype, gen), orthogonal(d_out, dtype, gen)
    lam = (torch.rand(d_out, d_in, generator=gen, dtype=torch.float64) + 0.5).to(dtype).to(v.device)
    damp = torch.tensor(0.05, device=v.device) if damping == "tensor" else damping
    ref = pc.precondition_reference(v.double(), qa.double(), qg.double(), lam.double(), damp)
    out = pc.precondition_triton(v, qa, qg, lam, damp)
    assert out.shape == v.shape and out.dtype == torch.float32
    assert_flash_rule(out, lowp_precondition(v, qa, qg, lam, damp if damping != "tensor" else damp.to(dtype)), ref,
                      dtype)


def test_precondition_strided_grads():
    gen = torch.Generator().manual_seed(21)
    v = randn(2, 19, 11, gen=gen).transpose(1, 2).contiguous().transpose(1, 2)  # (2, 19, 11), column-major
    qa, qg = orthogonal(11, gen=gen), orthogonal(19, gen=gen)
    lam = torch.rand(19, 11, generator=gen).to(v.device)
    ref = pc.precondition_reference(v.double(), qa.double(), qg.double(), lam.double(), 1e-2)
    assert_flash_rule(pc.precondition_triton(v, qa, qg, lam, 1e-2), pc.precondition_reference(v, qa, qg, lam, 1e-2),
                      ref, torch.float32)
