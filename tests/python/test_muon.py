"""Muon: parity with torch.optim.Muon, the Newton-Schulz core against a float64
polynomial written from the spec, routing to the AdamW fallback, and errors."""

import copy

import pytest
import torch
from helpers import assert_params_close

import torchopt_ext.optim as tox

STANDARD = (3.4445, -4.775, 2.0315)


def reference_newton_schulz(g, rows, steps, eps=1e-7, clamp=True, normalization="frobenius"):
    """Float64 quintic iteration written from classic.md §11 / rollfast.md §3.3."""
    x = g.to(torch.float64)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    if normalization == "frobenius":
        norm = x.norm()
        x = x / (torch.clamp(norm, min=eps) if clamp else norm + eps)
    elif normalization == "spectral":
        x = x / (torch.linalg.matrix_norm(x, 2) + eps)
    elif normalization == "aol":
        scale = torch.rsqrt(torch.clamp((x @ x.T).abs().sum(1, keepdim=True), min=eps))
        x = x * scale
    elif normalization == "schatten":
        x = x / torch.sqrt(torch.clamp((x @ x.T).norm(), min=eps))
    for i in range(steps):
        a, b, c = rows[min(i, len(rows) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def _run(ours_kwargs, ref_kwargs, shapes, dtype=torch.float32, steps=20, seed=0):
    torch.manual_seed(seed)
    ours = [torch.randn(s, dtype=dtype) for s in shapes]
    ref = [p.clone() for p in ours]
    a = tox.Muon(ours, **ours_kwargs)
    b = torch.optim.Muon(ref, **ref_kwargs)
    for _ in range(steps):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    return ours, ref


MUON_SHAPES = [(17, 33), (64, 16), (64, 16), (33, 17), (1, 40), (32, 32)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.02),
        dict(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0),
        dict(lr=0.01, adjust_lr_fn="match_rms_adamw", weight_decay=0.05),
        dict(lr=0.01, ns_steps=3, ns_coefficients=(3.0, -3.2, 1.2), eps=1e-5),
    ],
)
def test_matches_torch_muon(kwargs):
    # Same bf16 iteration, same op order: equal to a few ulps of fp32 (measured bitwise here).
    ours, ref = _run(kwargs, kwargs, MUON_SHAPES)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_matches_torch_muon_fp64_params_and_tensor_lr():
    ours, ref = _run(dict(lr=torch.tensor(0.02, dtype=torch.float64)), dict(lr=0.02), MUON_SHAPES, torch.float64)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(17, 33), (40, 9), (16, 16)])
@pytest.mark.parametrize("clamp", [True, False])
def test_newton_schulz_fp64_is_the_exact_polynomial(shape, clamp):
    torch.manual_seed(1)
    g = torch.randn(shape, dtype=torch.float64)
    table = [(4.0, -6.0, 2.5), (3.4445, -4.775, 2.0315)]
    ours = torch.ops.torchopt_ext.newton_schulz(
        g, coefficients=[x for row in table for x in row], steps=6, eps=1e-7, eps_clamp=clamp
    )
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference_newton_schulz(g, table, 6, clamp=clamp), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalization", ["spectral", "aol", "schatten"])
def test_newton_schulz_normalizations(normalization):
    torch.manual_seed(2)
    g = torch.randn(24, 40, dtype=torch.float64)
    ours = torch.ops.torchopt_ext.newton_schulz(g, normalization=normalization.upper())
    expected = reference_newton_schulz(g, [STANDARD], 5, normalization=normalization)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    # Every variant lands in the quintic's band around 1 (Keller Jordan: ~[0.68, 1.13] here).
    singular = torch.linalg.svdvals(ours)
    assert singular.min() > 0.5 and singular.max() < 1.3


def test_newton_schulz_batches_leading_dims_and_leaves_input_alone():
    torch.manual_seed(3)
    g = torch.randn(2, 3, 12, 20, dtype=torch.float64)
    before = g.clone()
    out = torch.ops.torchopt_ext.newton_schulz(g)
    assert torch.equal(g, before)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(
                out[i, j], reference_newton_schulz(g[i, j], [STANDARD], 5), rtol=1e-12, atol=1e-12
            )


def test_newton_schulz_bf16_matches_torch():
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(4)
    for shape in [(17, 33), (64, 16)]:
        g = torch.randn(shape)
        ours = torch.ops.torchopt_ext.newton_schulz(g, dtype=torch.bfloat16)
        expected = _zeropower_via_newtonschulz(g, STANDARD, 5, 1e-7)
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), expected.float(), rtol=0, atol=0)


def test_fallback_params_take_adamw():
    torch.manual_seed(5)
    shapes = [(12, 7), (7,), (), (3, 4, 5)]
    ours = [torch.randn(s) for s in shapes]
    ref = [p.clone() for p in ours]
    opt = tox.Muon(ours, lr=0.02, weight_decay=0.1, adam_lr=0.004, adam_betas=(0.9, 0.95), adam_eps=1e-10)
    muon_ref = torch.optim.Muon(ref[:1], lr=0.02, weight_decay=0.1)
    adam_ref = torch.optim.AdamW(ref[1:], lr=0.004, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1, foreach=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    sched_muon = torch.optim.lr_scheduler.StepLR(muon_ref, step_size=5, gamma=0.5)
    sched_adam = torch.optim.lr_scheduler.StepLR(adam_ref, step_size=5, gamma=0.5)
    for _ in range(20):
        for p, q in zip(ours, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        muon_ref.step()
        adam_ref.step()
        for s in (sched, sched_muon, sched_adam):
            s.step()
    assert_params_close(ours, ref, torch.float32)
    assert set(opt.state[ours[0]]) == {"step", "momentum_buffer"}
    assert set(opt.state[ours[3]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_use_muon_groups_route_explicitly():
    torch.manual_seed(6)
    conv = torch.randn(8, 3, 3, 3)
    head = torch.randn(10, 8)
    ref_conv = conv.clone().reshape(8, 27)
    ref_head = head.clone()
    opt = tox.Muon([{"params": [conv], "use_muon": True}, {"params": [head], "use_muon": False}], lr=0.02)
    muon_ref = torch.optim.Muon([ref_conv], lr=0.02)
    adam_ref = torch.optim.AdamW([ref_head], lr=0.02, weight_decay=0.1, foreach=False)
    for _ in range(20):
        g_conv, g_head = torch.randn_like(conv), torch.randn_like(head)
        conv.grad, ref_conv.grad = g_conv.clone(), g_conv.reshape(8, 27).clone()
        head.grad, ref_head.grad = g_head.clone(), g_head.clone()
        opt.step()
        muon_ref.step()
        adam_ref.step()
    torch.testing.assert_close(conv.reshape(8, 27), ref_conv, rtol=1e-6, atol=1e-6)
    assert_params_close([head], [ref_head], torch.float32)


def test_fp32_iteration_option_and_bf16_params():
    torch.manual_seed(7)
    p32 = torch.randn(24, 16)
    p_bf16 = p32.to(torch.bfloat16)
    a = tox.Muon([p32], lr=0.02, ns_dtype=torch.float32)
    b = tox.Muon([p_bf16], lr=0.02, ns_dtype=torch.float32, state_dtype=torch.float32)
    for _ in range(10):
        g = torch.randn(24, 16)
        p32.grad, p_bf16.grad = g.clone(), g.to(torch.bfloat16)
        a.step()
        b.step()
    assert b.state[p_bf16]["momentum_buffer"].dtype == torch.float32
    # bf16 storage rounds each step (~4e-3 relative); the trajectories stay together.
    torch.testing.assert_close(p_bf16.float(), p32, rtol=2e-2, atol=2e-2)


def test_bf16_param_step_is_fp32_math_rounded_once():
    torch.manual_seed(10)
    p = torch.randn(24, 16).to(torch.bfloat16)
    g = torch.randn(24, 16).to(torch.bfloat16)
    start = p.float()
    opt = tox.Muon([p], lr=0.05, weight_decay=0.1, state_dtype=torch.float32, ns_dtype=torch.float32)
    p.grad = g
    opt.step()
    # First step: B = 0.05 g, Nesterov U = lerp(g, B, 0.95) = g (0.05 + 0.95 * 0.05).
    update = g.float() * (0.05 + 0.95 * 0.05)
    o = torch.ops.torchopt_ext.newton_schulz(update, dtype=torch.float32)
    scale = max(1.0, 24 / 16) ** 0.5
    expected = (start * (1 - 0.05 * 0.1) + (-0.05 * scale) * o).to(torch.bfloat16)
    assert torch.equal(p, expected)


def test_stochastic_rounding_is_seeded():
    def run(seed):
        torch.manual_seed(8)
        p = torch.randn(16, 16).to(torch.bfloat16)
        opt = tox.Muon([p], lr=1e-3, stochastic_rounding=True, seed=seed, state_dtype=torch.float32)
        for _ in range(5):
            p.grad = torch.randn(16, 16).to(torch.bfloat16)
            opt.step()
        return p

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_load_torch_muon_checkpoint():
    torch.manual_seed(9)
    ref_p = torch.randn(6, 4)
    ref = torch.optim.Muon([ref_p], lr=0.02)
    ref_p.grad = torch.randn(6, 4)
    ref.step()
    ours_p = ref_p.clone()
    ours = tox.Muon([ours_p], lr=0.02)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # as if through torch.save / torch.load
    g = torch.randn(6, 4)
    ref_p.grad, ours_p.grad = g.clone(), g.clone()
    ref.step()
    ours.step()
    torch.testing.assert_close(ours_p, ref_p, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(ns_steps=0), "ns_steps"),
        (dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"),
        (dict(adjust_lr_fn="sqrt"), "adjust_lr_fn"),
        (dict(ns_normalization="nuclear"), "ns_normalization"),
        (dict(ns_dtype=torch.int32), "ns_dtype"),
        (dict(adam_betas=(0.9, 1.0)), "beta"),
        (dict(adam_eps=-1.0), "adam_eps"),
        (dict(adam_lr=-1.0), "adam_lr"),
        (dict(eps=-1.0), "eps"),
    ],
)
def test_bad_options_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"(?i){argument}"):
        tox.Muon([torch.randn(3, 3)], **kwargs)


def test_use_muon_true_rejects_vectors_and_op_rejects_vectors():
    with pytest.raises(ValueError, match="use_muon"):
        tox.Muon([{"params": [torch.randn(4)], "use_muon": True}])
    p, g = torch.randn(5), torch.randn(5)
    with pytest.raises(ValueError, match="matrices"):
        torch.ops.torchopt_ext.muon_step_(
            [p],
            [g],
            [torch.zeros(5)],
            [],
            [torch.zeros(())],
            torch.tensor(0.1, dtype=torch.float64),
            weight_decay=0.0,
            momentum=0.9,
            nesterov=True,
            ns_coefficients=list(STANDARD),
            ns_steps=5,
            eps=1e-7,
            adjust_lr_fn="original",
        )


def test_opcheck_newton_schulz():
    g = torch.randn(3, 8, 5)
    torch.library.opcheck(
        torch.ops.torchopt_ext.newton_schulz.default,
        (g,),
        dict(coefficients=list(STANDARD), steps=3, dtype=torch.float32),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


# -- Magma ---------------------------------------------------------------------


def reference_muon_magma(params, grads_per_step, lr, wd, mu, tau, keep):
    """Float64 Muon + Magma written from rollfast.md §5: decay folded into the
    masked update, score smoothed with 0.9 / 0.1, keep(t, i) supplies z."""
    params = [p.clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    scores = [torch.tensor(0.5) for _ in params]  # float32 state, as rollfast keeps it
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            buffers[i] = mu * buffers[i] + (1 - mu) * g
            update = (1 - mu) * g + mu * buffers[i]
            o = reference_newton_schulz(update, [STANDARD], 5)
            cos = torch.clamp((g * buffers[i]).sum() / torch.clamp(g.norm() * buffers[i].norm(), min=1e-12), -1, 1)
            scores[i] = scores[i].mul(0.9).add(torch.sigmoid(cos / tau).float(), alpha=0.1)
            z = 1.0 if keep(t, i) else 0.0
            scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
            params[i] = p - lr * z * scores[i].item() * (scale * o + wd * p)
    return params, [x.item() for x in scores]


def _magma_run(shapes, steps, data_seed=0, **kwargs):
    torch.manual_seed(data_seed)
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    start = [p.clone() for p in params]
    opt = tox.Muon(params, ns_dtype=None, use_magma=True, **kwargs)
    moved = []
    for gs in grads:
        before = [p.clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        moved.append([not torch.equal(p, b) for p, b in zip(params, before)])
    return start, grads, params, opt, moved


def test_magma_always_keep_matches_float64_reference():
    shapes = [(12, 7), (7, 12), (9, 9)]
    start, grads, params, opt, _ = _magma_run(shapes, 20, lr=0.02, weight_decay=0.1, magma_p=1.0, magma_tau=2.0)
    expected, scores = reference_muon_magma(start, grads, 0.02, 0.1, 0.95, 2.0, keep=lambda t, i: True)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)
    for p, s in zip(params, scores):
        assert opt.state[p]["magma_score"].item() == pytest.approx(s, rel=1e-6)  # fp32 score


def test_magma_never_keep_freezes_params_including_decay():
    start, _, params, opt, _ = _magma_run([(6, 5)], 5, lr=0.1, weight_decay=0.5, magma_p=0.0)
    assert torch.equal(params[0], start[0])
    assert opt.state[params[0]]["momentum_buffer"].abs().sum() > 0  # momentum still accumulates
    assert opt.state[params[0]]["magma_score"].item() != 0.5


def test_magma_mask_rate_and_attenuation():
    # 30 tensors x 20 steps = 600 draws: the keep rate is p within ~3 sigma
    # (0.02), and with independent gradients the multiplier z * s averages about
    # p * sigmoid(cos / tau) ~ 0.25-0.3 (rollfast's "~0.25x attenuation").
    shapes = [(4, 6)] * 30
    _, _, params, opt, moved = _magma_run(shapes, 20, data_seed=1, seed=7, lr=1e-3, weight_decay=0.0)
    draws = [m for step in moved for m in step]
    rate = sum(draws) / len(draws)
    assert 0.44 < rate < 0.56
    scores = [opt.state[p]["magma_score"].item() for p in params]
    attenuation = rate * sum(scores) / len(scores)
    assert 0.2 < attenuation < 0.33


def test_magma_draws_repeat_with_the_seed():
    shapes = [(4, 6)] * 8
    _, _, a, _, moved_a = _magma_run(shapes, 6, lr=1e-2, seed=11)
    _, _, b, _, moved_b = _magma_run(shapes, 6, lr=1e-2, seed=11)
    _, _, _, _, moved_c = _magma_run(shapes, 6, lr=1e-2, seed=12)
    assert moved_a == moved_b and all(torch.equal(x, y) for x, y in zip(a, b))
    assert moved_a != moved_c


def test_magma_state_round_trip_continues_bitwise():
    torch.manual_seed(3)
    params = [torch.randn(6, 4), torch.randn(4)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(8)]
    opt = tox.Muon(params, lr=0.02, use_magma=True, seed=5)
    for gs in grads[:4]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [p.detach().clone() for p in params]
    resumed = tox.Muon(resumed_params, lr=0.02, use_magma=True, seed=5)
    resumed.load_state_dict(saved)
    for gs in grads[4:]:
        for p, q, g in zip(params, resumed_params, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))
    assert set(opt.state[params[0]]) == {"step", "momentum_buffer", "magma_score"}


@pytest.mark.parametrize("kwargs, argument", [(dict(magma_p=1.5), "magma_p"), (dict(magma_tau=0.0), "magma_tau")])
def test_magma_bad_options(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        tox.Muon([torch.randn(3, 3)], use_magma=True, **kwargs)
