"""Magma on Adam / AdamW (rollfast.md §5): exact updates against the float64
reference with the optimizer's own draws, mask rate and attenuation, state,
compile, opcheck, AMP and option errors."""

import copy

import pytest
import torch
from reference.adam_magma import adam_magma_reference

import torchopt_ext.optim as tox

SHAPES = [(), (7,), (1001,), (17, 33), (3, 4, 5)]


def _keep(seed, p):
    return lambda t, i: torch.ops.torchopt_ext.magma_keep(seed, i, float(t), p)


def _run(opt_cls, shapes, steps, dtype=torch.float64, data_seed=0, compiled=False, **kwargs):
    torch.manual_seed(data_seed)
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, dtype=dtype) for s in shapes] for _ in range(steps)]
    start = [p.clone() for p in params]
    opt = opt_cls(params, **kwargs)
    step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
    deltas = []
    for gs in grads:
        before = [p.clone() for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        step()
        deltas.append([(p - b).to(torch.float64) for p, b in zip(params, before)])
    return start, grads, params, opt, deltas


@pytest.mark.parametrize(
    "opt_cls, kwargs, decoupled",
    [
        (tox.AdamW, dict(lr=1e-2, weight_decay=0.1), True),
        (tox.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True, betas=(0.8, 0.99)), True),
        (tox.Adam, dict(lr=1e-2, weight_decay=0.05, magma_tau=0.5), False),
    ],
)
def test_matches_float64_reference_with_the_optimizers_draws(opt_cls, kwargs, decoupled):
    seed, p = 123, 0.5
    start, grads, params, opt, _ = _run(opt_cls, SHAPES, 20, use_magma=True, magma_p=p, seed=seed, **kwargs)
    group = opt.param_groups[0]
    expected, scores = adam_magma_reference(
        start,
        grads,
        lr=group["lr"],
        betas=group["betas"],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        decoupled=decoupled,
        tau=group["magma_tau"],
        keep=_keep(seed, p),
        amsgrad=group["amsgrad"],
        maximize=group["maximize"],
    )
    for a, e in zip(params, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    for a, s in zip(params, scores):
        assert opt.state[a]["magma_score"].item() == pytest.approx(s, rel=1e-6, abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_params_track_the_reference(dtype):
    # fp32 math on fp32 state either way. bf16 params are rounded to nearest
    # after every step: with lr 0.1 the steps (~0.05) stay above half a bf16
    # spacing, and 20 roundings stay within ~10 bf16 ulps of the fp64 run.
    seed, p = 9, 0.5
    lr = 1e-2 if dtype == torch.float32 else 0.1
    start, grads, params, opt, _ = _run(
        tox.AdamW,
        SHAPES,
        20,
        dtype=dtype,
        lr=lr,
        weight_decay=0.1,
        use_magma=True,
        seed=seed,
        state_dtype=torch.float32,
    )
    expected, _ = adam_magma_reference(
        start,
        grads,
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.1,
        decoupled=True,
        tau=2.0,
        keep=_keep(seed, p),
    )
    tol = 2e-6 if dtype == torch.float32 else 10 * 2.0**-8
    for a, e in zip(params, expected):
        torch.testing.assert_close(a.to(torch.float64), e, rtol=tol, atol=tol)
    moved = max((e - s.double()).abs().max().item() for e, s in zip(expected, start))
    assert moved > 5 * tol  # the run moved well beyond the tolerance


def test_never_keep_freezes_params_including_decay_but_moments_move():
    start, _, params, opt, _ = _run(tox.AdamW, [(6, 5)], 5, lr=0.1, weight_decay=0.5, use_magma=True, magma_p=0.0)
    assert torch.equal(params[0], start[0])
    state = opt.state[params[0]]
    assert state["exp_avg"].abs().sum() > 0 and state["step"].item() == 5
    assert state["magma_score"].item() != 0.5


def test_mask_rate_and_attenuation():
    # weight_decay=0: the Adam direction does not depend on the params, so a
    # step of the Magma run is exactly z * s times the plain run's step.
    shapes = [(4, 6)] * 30
    _, _, _, opt, masked = _run(tox.AdamW, shapes, 20, data_seed=1, lr=1e-3, weight_decay=0.0, use_magma=True, seed=7)
    _, _, _, _, plain = _run(tox.AdamW, shapes, 20, data_seed=1, lr=1e-3, weight_decay=0.0)
    ratios = [(dm.norm() / dp.norm()).item() for sm, sp in zip(masked, plain) for dm, dp in zip(sm, sp)]
    kept = [r > 0 for r in ratios]
    rate = sum(kept) / len(kept)
    assert 0.44 < rate < 0.56  # 600 draws of p = 0.5: ~3 sigma
    assert all(0.5 < r < 0.7 for r, k in zip(ratios, kept) if k)  # s stays near sigmoid(cos / 2)
    attenuation = sum(ratios) / len(ratios)
    assert 0.22 < attenuation < 0.33  # rollfast's "~0.25x"


def test_use_magma_false_is_the_plain_kernel():
    _, _, a, opt, _ = _run(tox.AdamW, SHAPES, 5, dtype=torch.float32, lr=1e-2)
    _, _, b, _, _ = _run(tox.AdamW, SHAPES, 5, dtype=torch.float32, lr=1e-2, use_magma=False, magma_p=0.1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert "magma_score" not in opt.state[a[0]]


def test_state_dict_round_trip_continues_bitwise():
    torch.manual_seed(3)
    params = [torch.randn(6, 4), torch.randn(4)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(8)]
    opt = tox.AdamW(params, lr=0.02, use_magma=True, seed=5)
    for gs in grads[:4]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [p.detach().clone() for p in params]
    resumed = tox.AdamW(resumed_params, lr=0.02)  # options come from the checkpoint
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["use_magma"] and resumed.param_groups[0]["seed"] == 5
    for gs in grads[4:]:
        for p, q, g in zip(params, resumed_params, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq", "magma_score"}
    assert opt.state[params[0]]["magma_score"].dtype == torch.float32


def test_turning_magma_on_later_starts_scores_at_half():
    p = torch.randn(5)
    opt = tox.AdamW([p], lr=1e-2)
    p.grad = torch.randn(5)
    opt.step()
    opt.param_groups[0]["use_magma"] = True
    opt.step()
    assert opt.state[p]["magma_score"].item() != 0.5  # created at 0.5, then updated once


def test_compiled_step_matches_eager():
    torch._dynamo.reset()
    kwargs = dict(lr=1e-2, weight_decay=0.1, use_magma=True, seed=2)
    _, _, eager, _, _ = _run(tox.AdamW, [(8, 5), (5,), ()], 4, dtype=torch.float32, **kwargs)
    _, _, compiled, opt, _ = _run(tox.AdamW, [(8, 5), (5,), ()], 4, dtype=torch.float32, compiled=True, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert all(s["step"].item() == 4 for s in opt.state.values())


@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck(amsgrad):
    shapes = [(3, 5), (7,), ()]
    params = [torch.randn(s) for s in shapes]
    args = (
        params,
        [torch.randn(s) for s in shapes],
        [torch.zeros(s) for s in shapes],
        [torch.zeros(s) for s in shapes],
        [torch.zeros(s) for s in shapes] if amsgrad else [],
        [torch.full((), 0.5) for _ in shapes],
        [torch.zeros(()) for _ in shapes],
        torch.tensor(1e-2, dtype=torch.float64),
    )
    kwargs = dict(
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        decoupled_weight_decay=True,
        amsgrad=amsgrad,
        maximize=False,
        magma_p=0.5,
        magma_tau=2.0,
        seed=4,
    )
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.torchopt_ext.adam_magma_step_.default, args, kwargs, test_utils=utils)


def test_found_inf_skips_scores_too():
    p = torch.randn(6)
    opt = tox.AdamW([p], lr=1e-2, use_magma=True, seed=1)
    p.grad = torch.randn(6)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    p_before = p.clone()
    p.grad = torch.randn(6)
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p, p_before)
    assert all(torch.equal(v, before[k]) for k, v in opt.state[p].items())


def test_grad_scale_matches_unscaled_run():
    a = torch.randn(6, dtype=torch.float64)
    b = a.clone()
    oa = tox.AdamW([a], lr=1e-2, use_magma=True, seed=1)
    ob = tox.AdamW([b], lr=1e-2, use_magma=True, seed=1)
    for _ in range(4):
        g = torch.randn(6, dtype=torch.float64)
        a.grad, b.grad = g * 1024.0, g.clone()
        oa.grad_scale, oa.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, argument", [(dict(magma_p=1.5), "magma_p"), (dict(magma_tau=0.0), "magma_tau")])
def test_bad_options_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        tox.AdamW([torch.randn(3)], use_magma=True, **kwargs)
    with pytest.raises(ValueError, match=argument):
        tox.Adam([torch.randn(3)], **kwargs)


def test_op_rejects_bad_magma_arguments():
    p = torch.randn(3)
    args = ([p], [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], [], [torch.full((), 0.5)], [torch.zeros(())])
    kwargs = dict(
        beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True, amsgrad=False, maximize=False
    )
    lr = torch.tensor(1e-2)
    with pytest.raises(ValueError, match="magma_p"):
        torch.ops.torchopt_ext.adam_magma_step_(*args, lr, magma_p=-0.1, **kwargs)
    with pytest.raises(ValueError, match="magma_scores"):
        torch.ops.torchopt_ext.adam_magma_step_(*args[:5], [], args[6], lr, **kwargs)
    with pytest.raises(ValueError, match="magma_scores"):
        torch.ops.torchopt_ext.adam_magma_step_(
            *args[:5], [torch.full((), 0.5, dtype=torch.float64)], args[6], lr, **kwargs
        )
    with pytest.raises(ValueError, match="magma_keep: magma_p"):
        torch.ops.torchopt_ext.magma_keep(0, 0, 1.0, 2.0)
    assert torch.equal(p, args[0][0])


def test_nan_grad_gives_nan_update_and_finite_score():
    p = torch.randn(4)
    opt = tox.AdamW([p], lr=1e-2, use_magma=True, magma_p=1.0)
    p.grad = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    opt.step()
    assert torch.isnan(p).any()
    # cos is nan_to_num'ed to 0: score = 0.9 * 0.5 + 0.1 * sigmoid(0)
    assert opt.state[p]["magma_score"].item() == pytest.approx(0.5, abs=1e-7)
