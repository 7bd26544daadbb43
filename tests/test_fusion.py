"""Fusion: the op-by-op GELU equals torch's fused one and dispatches more ops."""

import torch

from cyclelab.lab.fusion import gelu_by_ops, gelu_fused, try_compile
from cyclelab.lab.roofline import count_torch_ops


def test_gelu_by_ops_equals_torch_gelu():
    x = torch.linspace(-6, 6, 1001)
    expected = torch.nn.functional.gelu(x.double(), approximate="tanh").float()
    assert torch.allclose(gelu_by_ops(x), expected, atol=1e-6)
    assert torch.allclose(gelu_fused(x), expected, atol=1e-6)


def test_the_fused_gelu_is_one_op_the_composite_many():
    x = torch.randn(8)
    assert count_torch_ops(lambda: gelu_fused(x)) == 1
    assert count_torch_ops(lambda: gelu_by_ops(x)) >= 6


def test_try_compile_reports_a_failure_instead_of_raising():
    def broken(x):
        raise RuntimeError("no kernel here")

    compiled, seconds, why = try_compile(broken, torch.ones(2))
    assert compiled is None and seconds == 0.0 and "no kernel here" in why
