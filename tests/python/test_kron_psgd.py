"""KronPSGD: parity with the float64 reference written from rlx-optim's
KronPsgd (seed 002) in fp64 and fp32, the non-matrix fallback, the clip, the
zero-pivot rule, defaults, bf16 params and errors."""

import os
import sys

import pytest
import torch

import torchopt_ext.optim as tox

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reference.kron_psgd import KronPSGDReference  # noqa: E402

# Tall, wide, square, a row vector, 1-D, 0-D and 3-D (the last three take the fallback).
SHAPES = [(12, 7), (5, 16), (9, 9), (1, 11), (13,), (), (3, 4, 2)]


def _triangular_start(n, dtype, generator):
    """A well-conditioned upper-triangular factor away from the identity."""
    noise = torch.randn(n, n, dtype=torch.float64, generator=generator) * 0.3
    return (torch.eye(n, dtype=torch.float64) + torch.triu(noise)).to(dtype)


def _run(kwargs, dtype, shapes=SHAPES, steps=25, seed=0, from_identity=False):
    """Ours vs the reference on shared grads. Unless from_identity, both start
    from the same random triangular factors: from the identity the crate's
    factors never move (see test_factors_stay_at_the_identity)."""
    torch.manual_seed(seed)
    ours = [torch.randn(s, dtype=dtype) for s in shapes]
    ref = [p.to(torch.float64, copy=True) for p in ours]
    opt = tox.KronPSGD(ours, **kwargs)
    ref_opt = KronPSGDReference(ref, **kwargs)
    if not from_identity:
        gen = torch.Generator().manual_seed(seed + 1)
        math = torch.float64 if dtype == torch.float64 else torch.float32
        for i, p in enumerate(ours):
            if p.dim() != 2:
                continue
            ql, qr = _triangular_start(p.shape[0], math, gen), _triangular_start(p.shape[1], math, gen)
            opt.state[p].update(
                step=torch.zeros(()),
                momentum_buffer=torch.zeros_like(p, dtype=math),
                ql=ql,
                qr=qr,
            )
            ref_opt.ql[i], ref_opt.qr[i] = ql.to(torch.float64, copy=True), qr.to(torch.float64, copy=True)
    for _ in range(steps):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, dtype=torch.float64)
            p.grad, q.grad = g.to(dtype), g.clone()
        opt.step()
        ref_opt.step()
    return ours, ref, opt, ref_opt


def _max_err(a, b):
    return max(float((x.double() - y).abs().max()) for x, y in zip(a, b))


CONFIGS = [
    dict(lr=0.05),
    dict(lr=0.02, precond_lr=0.3, momentum=0.5, weight_decay=0.01, clip=0.05),
    dict(lr=0.1, precond_lr=0.05, momentum=0.0, weight_decay=0.1, clip=100.0, eps=1e-3),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_matches_reference_float64(kwargs):
    ours, ref, opt, ref_opt = _run(kwargs, torch.float64)
    assert _max_err(ours, ref) < 1e-12  # measured 4e-15
    for i, p in enumerate(ours):
        if p.dim() == 2:
            for key, r in (("ql", ref_opt.ql[i]), ("qr", ref_opt.qr[i])):
                q = opt.state[p][key]
                torch.testing.assert_close(q, r, rtol=1e-12, atol=1e-12)
                assert torch.equal(q, torch.triu(q))


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_matches_reference_float32(kwargs):
    ours, ref, _, _ = _run(kwargs, torch.float32)
    # fp32 math over 25 steps of matmuls / solves (measured <= 2.3e-6); a
    # wrong factor, side or clip is off by >1e-2.
    assert _max_err(ours, ref) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factors_stay_at_the_identity(dtype):
    # The gradient as probe gives A == B at Q = I, so D = 0 and the factors
    # never leave the identity: the crate's KronPsgd is then a max-abs-clipped
    # heavy-ball SGD on matrices. Reproduced bitwise, not approximately.
    ours, ref, opt, _ = _run(CONFIGS[1], dtype, from_identity=True)
    for p in ours:
        if p.dim() == 2:
            assert torch.equal(opt.state[p]["ql"], torch.eye(p.shape[0], dtype=opt.state[p]["ql"].dtype))
            assert torch.equal(opt.state[p]["qr"], torch.eye(p.shape[1], dtype=opt.state[p]["qr"].dtype))
    assert _max_err(ours, ref) < (1e-12 if dtype == torch.float64 else 2e-5)


def test_clip_binds_and_scales_the_max_element_to_clip():
    torch.manual_seed(0)
    p = torch.randn(6, 4, dtype=torch.float64)
    start = p.clone()
    opt = tox.KronPSGD([p], lr=1.0, momentum=0.0, clip=0.01)
    p.grad = torch.randn(6, 4, dtype=torch.float64) * 100
    opt.step()
    assert abs(float((start - p).abs().max()) - 0.01) < 1e-15


def test_fallback_is_sgd_with_momentum_for_non_matrices():
    # The crate: v <- mu v + g + wd p, p <- p - lr v for every shape.len() != 2.
    torch.manual_seed(0)
    shapes = [(7,), (), (2, 3, 4)]
    ours = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ref = [p.clone() for p in ours]
    opt = tox.KronPSGD(ours, lr=0.1, momentum=0.8, weight_decay=0.05)
    sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.8, weight_decay=0.05)
    for _ in range(10):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        sgd.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    assert all(set(opt.state[p]) == {"step", "momentum_buffer"} for p in ours)


def test_zero_pivot_gives_zero_unknowns_as_the_crate():
    torch.manual_seed(0)
    p = torch.randn(4, 5, dtype=torch.float64)
    q = p.clone()
    opt = tox.KronPSGD([p], lr=0.1)
    ref = KronPSGDReference([q], lr=0.1)
    p.grad = torch.randn_like(p)
    q.grad = p.grad.clone()
    opt.step()
    ref.step()
    # Singular factors: a zero pivot on each side.
    opt.state[p]["ql"][1, 1] = 0.0
    opt.state[p]["qr"][3, 3] = 0.0
    ref.ql[0][1, 1] = 0.0
    ref.qr[0][3, 3] = 0.0
    for _ in range(3):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_defaults_are_the_crates():
    opt = tox.KronPSGD([torch.zeros(2, 2)], lr=0.1)
    d = opt.defaults
    assert (d["precond_lr"], d["momentum"], d["weight_decay"], d["eps"], d["clip"]) == (0.1, 0.9, 0.0, 1e-8, 1.0)
    with pytest.raises(TypeError):
        tox.KronPSGD([torch.zeros(2, 2)])  # lr is required, as KronPsgd::new(lr)


def test_bf16_params_keep_fp32_state_and_track_fp32():
    torch.manual_seed(0)
    p32 = torch.randn(8, 6)
    p16 = p32.to(torch.bfloat16)
    opt32 = tox.KronPSGD([p32], lr=0.01)
    opt16 = tox.KronPSGD([p16], lr=0.01)
    for _ in range(10):
        g = torch.randn(8, 6)
        p32.grad, p16.grad = g.clone(), g.to(torch.bfloat16)
        opt32.step()
        opt16.step()
    assert opt16.state[p16]["ql"].dtype == torch.float32
    assert opt16.state[p16]["momentum_buffer"].dtype == torch.float32
    assert float((p16.float() - p32).abs().max()) < 0.05


def test_maximize_equals_negated_grads():
    torch.manual_seed(0)
    a = torch.randn(5, 3, dtype=torch.float64)
    b = a.clone()
    opt_a = tox.KronPSGD([a], lr=0.1, maximize=True)
    opt_b = tox.KronPSGD([b], lr=0.1)
    for _ in range(5):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), -g
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_nan_grads_propagate():
    p = torch.randn(3, 4)
    opt = tox.KronPSGD([p], lr=0.1)
    p.grad = torch.full((3, 4), float("nan"))
    opt.step()
    assert torch.isnan(p).all()


def test_multiple_groups_and_closure():
    torch.manual_seed(0)
    w = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    x = torch.randn(32, 6)
    y = torch.randn(32, 4)
    opt = tox.KronPSGD([{"params": [w]}, {"params": [b], "lr": 0.01, "momentum": 0.0}], lr=0.05)

    def closure():
        opt.zero_grad()
        loss = ((x @ w + b - y) ** 2).mean()
        loss.backward()
        return loss

    first = float(closure())
    for _ in range(30):
        opt.step(closure)
    assert float(closure()) < 0.5 * first


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=0.1, precond_lr=-0.1), "precond_lr"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(lr=0.1, eps=0.0), "eps"),
        (dict(lr=0.1, clip=0.0), "clip"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.KronPSGD([torch.zeros(2, 2)], **kwargs)


def test_op_rejects_misaligned_factors():
    p = [torch.randn(3, 4), torch.randn(5)]
    g = [torch.randn_like(x) for x in p]
    bufs = [torch.zeros_like(x) for x in p]
    steps = [torch.zeros(()) for _ in p]
    lr = torch.tensor(0.1, dtype=torch.float64)
    op = torch.ops.torchopt_ext.kron_psgd_step_
    with pytest.raises(ValueError, match="one factor per 2-D param"):
        op(p, g, bufs, [], [], steps, lr)
    with pytest.raises(ValueError, match=r"qr\[0\] must have shape \(4, 4\)"):
        op(p, g, bufs, [torch.eye(3)], [torch.eye(3)], steps, lr)
