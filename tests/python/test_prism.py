"""PRISM: parity with the float64 reference written from rollfast.md §3.3
(both modes, every momentum / Nesterov / clipping variant, the raw spike clip
in both protection modes), routing to the AdamW fallback, and errors."""

import copy
import os
import sys

import pytest
import torch

import torchopt_ext.optim as tox

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reference.prism import PrismReference  # noqa: E402

# Tall, wide, square, a row vector and a 3-D kernel routed as (shape[0], rest).
SHAPES = [(24, 10), (10, 24), (16, 16), (1, 12)]


def _run(kwargs, shapes=SHAPES, steps=20, seed=0, grad_scale=None, use_prism=None):
    torch.manual_seed(seed)
    ours = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ref = [p.clone() for p in ours]
    group = dict(params=ours)
    if use_prism is not None:
        group["use_prism"] = use_prism
    opt = tox.PRISM([group], ns_dtype=torch.float64, **kwargs)
    ref_opt = PrismReference(ref, **kwargs)
    for k in range(steps):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p) * (grad_scale(k) if grad_scale else 1.0)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    return ours, ref, opt, ref_opt


def _max_err(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


VARIANTS = [
    dict(lr=0.02),
    dict(lr=0.02, weight_decay=0.1, gamma=0.5),
    dict(lr=0.02, grad_clip_max_amps=None),
    dict(lr=0.02, grad_clip_max_amps=(0.5, 0.05)),  # both caps active
    dict(lr=0.02, nesterov=False),
    dict(lr=0.02, nesterov=False, bias_correction=True),
    dict(lr=0.02, bias_correction=True),
    dict(lr=0.02, shape_nesterov=False),
    dict(lr=0.02, momentum_accumulator="heavy_ball", b1=0.9),
    dict(lr=0.02, momentum_accumulator="heavy_ball", shape_nesterov=False, b1=0.8),
    dict(lr=0.02, ns_iters=7, ns_coeffs=((3.4445, -4.775, 2.0315), (1.5, -0.5, 0.0))),
    dict(lr=0.02, gamma=0.0),
]


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_original_matches_reference(kwargs):
    ours, ref, _, _ = _run(kwargs)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.02, mode="bidirectional"),
        dict(lr=0.02, mode="bidirectional", gamma_l=0.3, gamma_r=2.0, weight_decay=0.1),
        dict(lr=0.02, mode="bidirectional", inv_steps=3, nesterov=False, grad_clip_max_amps=None),
    ],
)
def test_bidirectional_matches_reference(kwargs):
    ours, ref, _, _ = _run(kwargs)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_post_clip_caps_the_update_rms():
    """The RMS cap binds exactly (the default (2, 10) never binds on "original"
    updates, whose singular values are <= 1: parity above covers it as a no-op,
    and the (0.5, 0.05) variant covers both caps binding)."""
    torch.manual_seed(1)
    p = torch.randn(8, 40, dtype=torch.float64)
    before = p.clone()
    opt = tox.PRISM([p], lr=1.0, ns_dtype=torch.float64, grad_clip_max_amps=(0.005, 10.0))
    p.grad = torch.randn_like(p)
    opt.step()
    rms = (p - before).square().mean().sqrt()
    assert abs(float(rms) - 0.005) < 1e-9


def test_raw_clip_permissive_and_strict():
    big = lambda k: 100.0 if k in (3, 11) else 1.0  # noqa: E731
    for permissive in (True, False):
        kwargs = dict(lr=0.02, raw_global_grad_clip=30.0, permissive_spike_protection=permissive)
        ours, ref, opt, ref_opt = _run(kwargs, grad_scale=big)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        # Strict: the two spikes were skipped, step counters included.
        steps = {float(opt.state[p]["step"]) for p in ours}
        assert steps == ({20.0} if permissive else {18.0})


def test_strict_spike_leaves_everything_untouched():
    torch.manual_seed(2)
    ps = [torch.randn(12, 6), torch.randn(6, 12)]
    opt = tox.PRISM(ps, lr=0.05, raw_global_grad_clip=5.0, permissive_spike_protection=False, use_magma=True)
    for p in ps:
        p.grad = torch.randn_like(p) * 0.1
    opt.step()
    snap_p = [p.clone() for p in ps]
    snap_s = copy.deepcopy(opt.state_dict()["state"])
    for p in ps:
        p.grad = torch.randn_like(p) * 100
    opt.step()
    for p, q in zip(ps, snap_p):
        assert torch.equal(p, q)
    now = opt.state_dict()["state"]
    for k in snap_s:
        for key, v in snap_s[k].items():
            assert torch.equal(now[k][key], v), key


def test_fp32_default_close_to_reference():
    torch.manual_seed(0)
    ours = [torch.randn(s) for s in SHAPES]
    ref = [p.double() for p in ours]
    opt = tox.PRISM(ours, lr=0.02)
    ref_opt = PrismReference(ref, lr=0.02)
    for _ in range(20):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.double()
        opt.step()
        ref_opt.step()
    assert _max_err([p.double() for p in ours], ref) < 1e-4


def test_routing_and_adam_fallback():
    torch.manual_seed(3)
    w, b, k = torch.randn(8, 5), torch.randn(8), torch.randn(4, 3, 2)
    b2, k2 = b.clone(), k.clone()
    opt = tox.PRISM([w, b, k], lr=0.01, adam_lr=0.003, weight_decay=0.1, adam_betas=(0.8, 0.99))
    adam = torch.optim.AdamW([b2, k2], lr=0.003, weight_decay=0.1, betas=(0.8, 0.99))
    for _ in range(5):
        for x, y in ((b, b2), (k, k2)):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        w.grad = torch.randn_like(w)
        opt.step()
        adam.step()
    torch.testing.assert_close(b, b2)
    torch.testing.assert_close(k, k2)
    assert set(opt.state[w]) == {"step", "mu"} and set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}


def test_use_prism_reshapes_conv_kernels():
    ours, ref, _, _ = _run(dict(lr=0.02), shapes=[(6, 3, 2), (4, 2, 2, 2)], use_prism=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bf16_momentum_and_params():
    torch.manual_seed(4)
    p = torch.randn(16, 8, dtype=torch.bfloat16)
    opt = tox.PRISM([p], lr=0.02, mu_dtype=torch.bfloat16, seed=5)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert opt.state[p]["mu"].dtype == torch.bfloat16 and torch.isfinite(p.float()).all()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(b1=1.0), "b1"),
        (dict(gamma=-1.0), "gamma"),
        (dict(mode="fancy"), "mode"),
        (dict(momentum_accumulator="nope"), "momentum_accumulator"),
        (dict(grad_clip_max_amps=(2.0, -1.0)), "grad_clip_max_amps"),
        (dict(raw_global_grad_clip=0.0), "raw_global_grad_clip"),
        (dict(ns_iters=0), "ns_iters"),
        (dict(inv_steps=0), "inv_steps"),
        (dict(ns_coeffs=(1.0, 2.0)), "ns_coeffs"),
        (dict(preconditioning="l3"), "preconditioning"),
        (dict(inv_scale=0.0), "inv_scale"),
    ],
)
def test_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tox.PRISM([torch.randn(3, 3)], **kwargs)


def test_op_errors_name_the_argument():
    p = torch.randn(4, 4)
    with pytest.raises(ValueError, match="momentum_accumulator"):
        torch.ops.torchopt_ext.prism_step_(
            [p], [torch.randn(4, 4)], [torch.zeros(4, 4)], [], [torch.zeros(())], torch.tensor(0.1),
            momentum_accumulator="x",
        )  # fmt: skip


def test_magma_never_keep_freezes_and_scores_move():
    torch.manual_seed(6)
    p = torch.randn(6, 5)
    start = p.clone()
    opt = tox.PRISM([p], lr=0.1, weight_decay=0.5, use_magma=True, magma_p=0.0, seed=1)
    for _ in range(4):
        p.grad = torch.randn_like(p)
        opt.step()
    assert torch.equal(p, start)
    assert float(opt.state[p]["magma_score"]) != 0.5


def _nadamw_reference(params, grads_per_step, lr, b1, b2, eps, wd):
    """rollfast §3.4's scale_by_adam with nesterov, then decayed weights and
    -lr, in float64."""
    out = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            m[i] = (1 - b1) * g + b1 * m[i]
            v[i] = (1 - b2) * g * g + b2 * v[i]
            m_hat = b1 * m[i] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            u = m_hat / (torch.sqrt(v_hat) + eps)
            out[i] = out[i] - lr * (u + wd * out[i])
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_adam_nesterov_fallback_matches_reference(dtype):
    torch.manual_seed(7)
    shapes = [(7,), (), (3, 4, 5), (6, 5)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    start = [p.detach().double().clone() for p in params[:3]]
    opt = tox.PRISM(params, lr=0.01, weight_decay=0.1, adam_lr=0.003, adam_betas=(0.8, 0.99), adam_nesterov=True)
    grads_per_step = []
    for _ in range(20):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        grads_per_step.append([g.double() for g in grads[:3]])
        opt.step()
    expected = _nadamw_reference(start, grads_per_step, 0.003, 0.8, 0.99, 1e-8, 0.1)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    err = _max_err([p.double() for p in params[:3]], expected)
    assert err < tol, err
    # And it is not plain AdamW: the same run without the flag differs.
    torch.manual_seed(7)
    params2 = [torch.randn(s, dtype=dtype) for s in shapes]
    opt2 = tox.PRISM(params2, lr=0.01, weight_decay=0.1, adam_lr=0.003, adam_betas=(0.8, 0.99))
    for grads in grads_per_step:
        for p, g in zip(params2[:3], grads):
            p.grad = g.to(dtype)
        params2[3].grad = torch.randn_like(params2[3])
        opt2.step()
    assert _max_err([p.double() for p in params2[:3]], expected) > 1e-4


def test_adam_nesterov_rejects_non_bool():
    with pytest.raises(ValueError, match="adam_nesterov"):
        tox.PRISM([torch.randn(3)], adam_nesterov="yes")
    # The NAdamW fallback has no Magma masking: the combination is refused.
    with pytest.raises(ValueError, match="adam_nesterov=True with use_magma"):
        tox.PRISM([torch.randn(3)], adam_nesterov=True, use_magma=True)


def test_raw_global_clip_spans_all_groups():
    # Each group's grads alone stay under the threshold; together they spike.
    # One norm over both groups: the same result as one group with all params.
    torch.manual_seed(11)
    shapes = [(6, 5), (4, 7)]
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) * 3 for s in shapes] for _ in range(4)]
    norms = [max(float(g.norm()) for g in step) for step in grads]
    joint = [float(torch.stack([g.norm() for g in step]).norm()) for step in grads]
    clip = 0.5 * (max(norms) + min(joint))
    assert max(norms) < clip < min(joint)

    def run(make):
        params = [p.clone() for p in start]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return params, opt

    kw = dict(lr=0.02, ns_dtype=torch.float64, raw_global_grad_clip=clip)
    split, _ = run(lambda ps: tox.PRISM([dict(params=[ps[0]]), dict(params=[ps[1]])], **kw))
    joined, _ = run(lambda ps: tox.PRISM(ps, **kw))
    unclipped, _ = run(lambda ps: tox.PRISM(ps, **{**kw, "raw_global_grad_clip": None}))
    assert _max_err(split, joined) < 1e-13
    assert _max_err(split, unclipped) > 1e-6  # the clip did bind
    # Strict protection skips every group on a joint spike.
    strict, opt = run(
        lambda ps: tox.PRISM([dict(params=[ps[0]]), dict(params=[ps[1]])], permissive_spike_protection=False, **kw)
    )
    assert all(torch.equal(p, q) for p, q in zip(strict, start))
    assert all(float(opt.state[p]["step"]) == 0 for p in strict)
