"""dtypes torch.optim accepts: float64 and complex parameters are updated as torch.optim updates them,
bitwise (its default CPU path, the single-tensor one), on every backend; mixed with fp32 ones too."""

from __future__ import annotations

import pytest
import torch

from dropin_support import PAIRS, assert_params_equal, assert_same, tolerance

OPTIONS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True, betas=(0.8, 0.99), eps=1e-6)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
]


def run_against_torch(kind, backend, options, dtypes, steps=6):
    """Our optimizer and torch's on copies of tensors of ``dtypes``, the same gradients; compared each step."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 1, 3)]
    initial = [torch.randn(shape, generator=generator, dtype=dtype) for shape, dtype in zip(shapes, dtypes)]
    ours_params = [t.clone().requires_grad_() for t in initial]
    torch_params = [t.clone().requires_grad_() for t in initial]
    ours_cls, torch_cls = PAIRS[kind]
    ours = ours_cls(ours_params, backend=backend, **options)
    theirs = torch_cls(torch_params, **options)  # torch's default: the single-tensor path on CPU
    for _ in range(steps):
        for p, q in zip(ours_params, torch_params):
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
        for p, q in zip(ours_params, torch_params):
            assert_params_equal([p], [q], atol=tolerance(p.dtype))
            for key, value in theirs.state[q].items():
                if isinstance(value, torch.Tensor) and key != "step":
                    assert_same(ours.state[p][key], value, atol=tolerance(p.dtype))


@pytest.mark.parametrize("kind, options", OPTIONS, ids=[f"{k}-{o}" for k, o in OPTIONS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.complex64])
def test_float64_and_complex_bitwise_equal_to_torch(backend, kind, options, dtype):
    # complex64 too is bitwise: it takes the same exact path (torch's own complex arithmetic).
    run_against_torch(kind, backend, options, [dtype] * 3)


@pytest.mark.parametrize("kind, options", OPTIONS[1::2], ids=[f"{k}-{o}" for k, o in OPTIONS[1::2]])
def test_mixed_float32_float64_complex_model(backend, kind, options):
    run_against_torch(kind, backend, options, [torch.float32, torch.float64, torch.complex64])


def test_float64_is_not_rounded_through_float32(backend):
    """An update smaller than fp32 resolution at 1.0 must still move a float64 parameter."""
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    optimizer = PAIRS["SGD"][0]([p], lr=1e-12, backend=backend)
    p.grad = torch.ones(3, dtype=torch.float64)
    optimizer.step()
    assert (p < 1).all() and (p == 1 - 1e-12).all()
