"""Triton covariance kernels (linear, conv expand/reduce) against float64 references, in the interpreter on CPU."""
import pytest
import torch

from kernel_check import (DTYPES, assert_flash_rule, lowp_conv_covariance, lowp_linear_covariance, randn,
                          requires_triton)
from kfac_kernels.ops import covariance as cov

pytestmark = requires_triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("append_one", [False, True])
@pytest.mark.parametrize("split", [None, 3])  # 3: the atomic path (row slices meet in the output)
def test_linear_covariance(dtype, append_one, split):
    gen = torch.Generator().manual_seed(1)
    a = randn(37, 21, dtype=dtype, gen=gen)
    ref = cov.linear_covariance_reference(a.double(), append_one=append_one)
    out = cov.linear_covariance_triton(a, append_one=append_one, split=split)
    assert out.shape == (22 if append_one else 21,) * 2
    assert torch.equal(out, out.T)  # mirrored, not recomputed
    assert_flash_rule(out, lowp_linear_covariance(a, append_one), ref, dtype)


def test_linear_covariance_accumulates_into_out_and_strided_input():
    gen = torch.Generator().manual_seed(2)
    a = randn(19, 40, gen=gen)[:, ::2]  # non-contiguous columns
    out = torch.ones(21, 21, dtype=torch.float64, device=a.device)
    cov.linear_covariance_triton(a, append_one=True, out=out)
    ref = cov.linear_covariance_reference(a.double(), append_one=True) + 1
    assert float((out.cpu() - ref.cpu()).abs().max()) < 1e-4


CONVS = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=1, stride=1, padding=0, dilation=1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("reduce", [False, True])
def test_conv_covariance(dtype, conv, reduce):
    gen = torch.Generator().manual_seed(3)
    x = randn(2, 3, 7, 6, dtype=dtype, gen=gen)
    ref = cov.conv_covariance_reference(x.double(), reduce=reduce, append_one=True, **conv)
    out = cov.conv_covariance_triton(x, reduce=reduce, append_one=True, **conv)
    assert out.shape == ref.shape
    assert_flash_rule(out, lowp_conv_covariance(x, reduce, True, **conv), ref, dtype)


def test_conv_covariance_split_and_channels_last():
    gen = torch.Generator().manual_seed(4)
    x = randn(3, 5, 6, 5, gen=gen).to(memory_format=torch.channels_last)
    ref = cov.conv_covariance_reference(x.double(), 3, padding=1)
    out = cov.conv_covariance_triton(x, 3, padding=1, split=4)
    assert_flash_rule(out, cov.conv_covariance_reference(x, 3, padding=1), ref, torch.float32)
