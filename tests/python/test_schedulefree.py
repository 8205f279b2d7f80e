"""Schedule-Free: fused ScheduleFreeAdamW / ScheduleFreeSGD against the
schedulefree package, the generic ScheduleFree wrapper against the package's
wrappers and against a float64 reference written from rollfast.md §4.2,
train/eval switching, checkpoints in both modes and the AdamC first step."""

from __future__ import annotations

import copy
import io
import math

import pytest
import schedulefree
import torch
from helpers import SHAPES, make_params, tolerances
from reference.schedulefree import ScheduleFreeSGDReference

import torchopt_ext.optim as tox

STEPS = 24
SWITCH_AT = (7, 15)  # eval() then train() after these steps
WRAPPER_SHAPES = [(1,), (7,), (1001,), (17, 33), (3, 4, 5)]  # the package's wrapper cannot swap 0-d tensors

FUSED_CASES = {
    "plain": dict(),
    "warmup_decay": dict(warmup_steps=6, weight_decay=0.05),
    "r_power": dict(r=0.5, weight_lr_power=1.0, warmup_steps=3),
}


def _set_grads(pairs, dtype):
    for p, q in pairs:
        g = torch.randn(p.shape, dtype=dtype)
        p.grad = g.clone()
        q.grad = g.clone()


def _max_diff(a, b):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def _run_against(ours, ref, ps, qs, dtype, tol):
    """Steps both, switching to eval and back mid-run; compares y after every
    step, x at every switch and at the end. Returns the largest difference."""
    worst = 0.0
    for k in range(STEPS):
        _set_grads(zip(ps, qs), dtype)
        ours.step()
        ref.step()
        worst = max(worst, _max_diff(ps, qs))
        if k in SWITCH_AT:
            ours.eval()
            ref.eval()
            worst = max(worst, _max_diff(ps, qs))
            for p, q in zip(ps, qs):
                torch.testing.assert_close(p, q, **tol)
            ours.train()
            ref.train()
    ours.eval()
    ref.eval()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **tol)
    return max(worst, _max_diff(ps, qs))


def _reference_tol(dtype):
    # The *Reference classes keep x, y, z and reorder the algebra (z-based,
    # x.mul().add()), so fp32 agreement is a few ulps of the values, not bitwise.
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12}
    return {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(FUSED_CASES))
@pytest.mark.parametrize(
    "ours_cls, ref_cls, lr",
    [
        (tox.ScheduleFreeAdamW, schedulefree.AdamWScheduleFree, 1e-2),
        (tox.ScheduleFreeAdamW, schedulefree.AdamWScheduleFreeReference, 1e-2),
        (tox.ScheduleFreeSGD, schedulefree.SGDScheduleFree, 0.05),
        (tox.ScheduleFreeSGD, schedulefree.SGDScheduleFreeReference, 0.05),
    ],
)
def test_fused_matches_package(ours_cls, ref_cls, lr, case, dtype, capsys):
    ps = make_params(SHAPES, dtype)
    qs = [p.clone() for p in ps]
    kwargs = dict(lr=lr, **FUSED_CASES[case])
    ours = ours_cls(ps, **kwargs)
    ref = ref_cls(qs, **kwargs)
    ref.train()
    tol = _reference_tol(dtype) if "Reference" in ref_cls.__name__ else tolerances(dtype)
    worst = _run_against(ours, ref, ps, qs, dtype, tol)
    with capsys.disabled():
        print(f"\n[max |diff|] {ours_cls.__name__} vs {ref_cls.__name__} {case} {dtype}: {worst:.3g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ref_cls", [schedulefree.ScheduleFreeWrapper, schedulefree.ScheduleFreeWrapperReference])
@pytest.mark.parametrize(
    "base, base_kwargs, sf_kwargs",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.5), dict()),
        (tox.Adam, dict(lr=1e-2), dict(r=0.5)),
        (
            tox.AdamW,
            dict(lr=1e-2, betas=(0.0, 0.99), weight_decay=0.0),
            dict(weight_decay_at_y=0.1, weight_lr_power=1.0),
        ),
    ],
)
def test_wrapper_matches_package(base, base_kwargs, sf_kwargs, ref_cls, dtype, capsys):
    ps = make_params(WRAPPER_SHAPES, dtype)
    qs = [p.clone() for p in ps]
    # The package's wrapper weights by lr_max^weight_lr_power: use_lr_max=True.
    ours = tox.ScheduleFree(base(ps, **base_kwargs), b1=0.9, use_lr_max=True, **sf_kwargs)
    ref = ref_cls(base(qs, **base_kwargs), momentum=0.9, **sf_kwargs)
    ref.train()
    # A decaying lr makes lr_max differ from lr: the package's weighting.
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=5, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref.base, step_size=5, gamma=0.5)
    worst = 0.0
    for k in range(STEPS):
        _set_grads(zip(ps, qs), dtype)
        ours.step()
        ref.step()
        sched_ours.step()
        sched_ref.step()
        worst = max(worst, _max_diff(ps, qs))
        if k in SWITCH_AT:
            ours.eval()
            ref.eval()
            worst = max(worst, _max_diff(ps, qs))
            ours.train()
            ref.train()
    ours.eval()
    ref.eval()
    worst = max(worst, _max_diff(ps, qs))
    tol = _reference_tol(dtype) if "Reference" in ref_cls.__name__ else tolerances(dtype)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **tol)
    assert worst <= tol["atol"] * 10
    with capsys.disabled():
        print(f"\n[max |diff|] ScheduleFree({base.__name__}) vs {ref_cls.__name__} {dtype}: {worst:.3g}")


def _lr_factor(k: int) -> float:
    # Rises for 4 steps, holds, then decays: lr and lr_max part ways.
    if k < 4:
        return (k + 1) / 4
    return 1.0 if k < 8 else 0.8 ** (k - 7)


WEIGHTING_CASES = {
    "practical": dict(weighting_mode="practical"),
    "PRACTICAL_lr_max": dict(weighting_mode="PRACTICAL", use_lr_max=True),
    "power": dict(weighting_mode="Power", weight_lr_power=1.5),
    "schedulet": dict(weighting_mode="schedulet", r=1.0),
    "theoretical": dict(weighting_mode="theoretical"),
    "c_warmup": dict(weighting_mode="practical", c_warmup=3),
    "b1_anneal": dict(weighting_mode="schedulet", b1_anneal_steps=10, b1_max=0.99),
    "adamc": dict(weighting_mode="practical", adamc_weight_decay=0.5),
    # lr_max starts above every lr of the schedule: the weights stay constant.
    "lr_max_init": dict(weighting_mode="practical", use_lr_max=True, lr_max_init=0.5),
}


@pytest.mark.parametrize("case", sorted(WEIGHTING_CASES))
def test_wrapper_weighting_modes_match_spec_reference(case):
    dtype = torch.float64
    base_lr = 0.3
    ps = make_params(WRAPPER_SHAPES, dtype)
    ref = ScheduleFreeSGDReference(ps, lr=lambda k: base_lr * _lr_factor(k), **WEIGHTING_CASES[case])
    ours = tox.ScheduleFree(torch.optim.SGD(ps, lr=base_lr), **WEIGHTING_CASES[case])
    sched = torch.optim.lr_scheduler.LambdaLR(ours, _lr_factor)
    for k in range(STEPS):
        grads = [torch.randn_like(p) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        ours.step()
        ref.step(grads)
        sched.step()
        for p, y in zip(ps, ref.y):
            torch.testing.assert_close(p, y, rtol=1e-12, atol=1e-12)
        if k == SWITCH_AT[0]:
            ours.eval()
            for p, x in zip(ps, ref.x()):
                torch.testing.assert_close(p, x, rtol=1e-12, atol=1e-12)
            ours.train()
    state = ours.param_groups[0]["sf_state"]
    assert state[0].item() == STEPS
    assert state[1].item() == pytest.approx(ref.weight_sum, rel=1e-14)
    assert state[3].item() == pytest.approx(ref.b1, rel=1e-14)


def test_weighting_modes_differ():
    # Guards the test above against modes that silently collapse to one.
    finals = {}
    for mode in ("practical", "schedulet", "theoretical"):
        torch.manual_seed(1)
        ps = make_params([(5,)], torch.float64)
        opt = tox.ScheduleFree(torch.optim.SGD(ps, lr=0.3), weighting_mode=mode)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor)
        for _ in range(12):
            ps[0].grad = torch.randn(5, dtype=torch.float64)
            opt.step()
            sched.step()
        finals[mode] = ps[0].clone()
    assert not torch.allclose(finals["practical"], finals["schedulet"])
    assert not torch.allclose(finals["schedulet"], finals["theoretical"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamc_first_step_is_exact(dtype):
    # rollfast.md §8: zero gradients, lr 0.01 (matrices) / 0.02 (vectors),
    # lambda = 0.1, no warm-up: the first update is -gamma^2 * lambda * theta (c_1 = 1).
    matrix = torch.ones(4, 3, dtype=dtype)
    vector = torch.ones(5, dtype=dtype)
    base = torch.optim.SGD([{"params": [matrix], "lr": 0.01}, {"params": [vector], "lr": 0.02}], lr=0.01)
    opt = tox.ScheduleFree(base, adamc_weight_decay=0.1)
    before = [matrix.clone(), vector.clone()]
    matrix.grad = torch.zeros_like(matrix)
    vector.grad = torch.zeros_like(vector)
    opt.step()
    # theta - 1e-5 is stored rounded to the param dtype's spacing just below
    # 1 (2^-53 in fp64, 2^-24 in fp32), so the update equals -1e-5 to that.
    tol = dict(rtol=0, atol=2.0**-52 if dtype == torch.float64 else 2.0**-24)
    torch.testing.assert_close(matrix - before[0], torch.full_like(matrix, -1e-5), **tol)
    torch.testing.assert_close(vector - before[1], torch.full_like(vector, -4e-5), **tol)


def _checkpoint_roundtrip(make_opt, shapes, mode):
    """Run 8 steps, optionally eval(), checkpoint (params + state_dict through
    torch.save), then train() and 8 more steps; a fresh optimizer loaded from
    the checkpoint must continue bitwise."""
    params = make_params(shapes, torch.float32)
    grads = [[torch.randn_like(p) for p in params] for _ in range(16)]
    opt = make_opt(params)

    def run(opt, params, gs):
        for g in gs:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()

    run(opt, params, grads[:8])
    if mode == "eval":
        opt.eval()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    opt.train()
    run(opt, params, grads[8:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [p.clone() for p in saved["params"]]
    resumed = make_opt(resumed_params)
    resumed.load_state_dict(saved["opt"])
    resumed.train()
    run(resumed, resumed_params, grads[8:])
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    return resumed


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: tox.ScheduleFreeAdamW(ps, lr=1e-2, warmup_steps=3, weight_decay=0.1),
        lambda ps: tox.ScheduleFreeSGD(ps, lr=0.05, warmup_steps=3, r=1.0),
        lambda ps: tox.ScheduleFree(torch.optim.AdamW(ps, lr=1e-2), weighting_mode="schedulet", b1_anneal_steps=5),
        lambda ps: tox.ScheduleFree(tox.SGD(ps, lr=0.05, momentum=0.9), adamc_weight_decay=0.1),
    ],
    ids=["AdamW", "SGD", "wrapper_torch_AdamW", "wrapper_ours_SGD"],
)
def test_checkpoint_resumes_bitwise_in_both_modes(make_opt, mode):
    resumed = _checkpoint_roundtrip(make_opt, [(5, 3), (4,)], mode)
    if isinstance(resumed, tox.ScheduleFree):
        assert resumed.train_mode
    else:
        assert all(group["train_mode"] for group in resumed.param_groups)


def test_state_dict_records_mode():
    p = torch.randn(3)
    opt = tox.ScheduleFreeSGD([p])
    p.grad = torch.randn(3)
    opt.step()
    assert opt.state_dict()["param_groups"][0]["train_mode"] is True
    opt.eval()
    assert opt.state_dict()["param_groups"][0]["train_mode"] is False
    wrapper = tox.ScheduleFree(torch.optim.SGD([p], lr=0.1))
    wrapper.eval()
    assert wrapper.state_dict()["train_mode"] is False


def test_fused_state_is_one_buffer_beyond_the_base():
    p = torch.randn(10, 10)
    sgd = tox.ScheduleFreeSGD([p])
    p.grad = torch.randn_like(p)
    sgd.step()
    big = {k for k, v in sgd.state[p].items() if v.numel() > 1}
    assert big == {"z"}
    q = torch.randn(10, 10)
    adamw = tox.ScheduleFreeAdamW([q])
    q.grad = torch.randn_like(q)
    adamw.step()
    assert {k for k, v in adamw.state[q].items() if v.numel() > 1} == {"z", "exp_avg_sq"}


def test_step_does_not_write_grad_and_closure_is_used():
    p = torch.randn(6, requires_grad=True)
    opt = tox.ScheduleFreeAdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    y0 = p.detach().clone()
    loss = opt.step(closure)
    torch.testing.assert_close(loss, (y0**2).sum())
    # The package overwrites grad with the step direction; we keep the gradient.
    assert torch.equal(p.grad, 2 * y0)


def test_bf16_params_use_fp32_math():
    p32 = torch.randn(300)
    p16 = p32.to(torch.bfloat16)
    a = tox.ScheduleFreeAdamW([p32], lr=1e-2)
    b = tox.ScheduleFreeAdamW([p16], lr=1e-2, state_dtype=torch.float32)
    for _ in range(10):
        g = torch.randn(300)
        p32.grad = g.clone()
        p16.grad = g.to(torch.bfloat16)
        a.step()
        b.step()
    assert b.state[p16]["z"].dtype == torch.float32
    torch.testing.assert_close(p16.float(), p32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cls", [tox.ScheduleFreeAdamW, tox.ScheduleFreeSGD])
def test_step_in_eval_mode_raises(cls):
    p = torch.randn(3)
    opt = cls([p])
    opt.eval()
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    wrapper = tox.ScheduleFree(torch.optim.SGD([p], lr=0.1))
    wrapper.eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        wrapper.step()


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (tox.ScheduleFreeAdamW, dict(betas=(0.0, 0.999)), "betas\\[0\\]"),
        (tox.ScheduleFreeAdamW, dict(betas=(0.9, 1.0)), "betas\\[1\\]"),
        (tox.ScheduleFreeAdamW, dict(eps=-1.0), "eps"),
        (tox.ScheduleFreeAdamW, dict(warmup_steps=-1), "warmup_steps"),
        (tox.ScheduleFreeSGD, dict(momentum=1.0), "momentum"),
        (tox.ScheduleFreeSGD, dict(weight_decay=-0.1), "weight_decay"),
        (tox.ScheduleFreeSGD, dict(lr=-1.0), "lr"),
    ],
)
def test_fused_rejects_bad_hyperparameters(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([torch.randn(3)], **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weighting_mode="linear"), "weighting_mode"),
        (dict(b1=0.0), "b1"),
        (dict(b1_max=1.5), "b1_max"),
        (dict(c_warmup=-1), "c_warmup"),
        (dict(b1_anneal_steps=-2), "b1_anneal_steps"),
        (dict(adamc_weight_decay=-1.0), "adamc_weight_decay"),
    ],
)
def test_wrapper_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.ScheduleFree(torch.optim.SGD([torch.randn(3)], lr=0.1), **kwargs)


def test_wrapper_rejects_non_optimizer_and_op_names_bad_mode():
    with pytest.raises(TypeError, match="base_optimizer"):
        tox.ScheduleFree([torch.randn(3)])
    p, z = torch.randn(3), torch.randn(3)
    state = torch.tensor([0.0, 0.0, 0.0, 0.9], dtype=torch.float64)
    with pytest.raises(ValueError, match="weighting_mode"):
        torch.ops.torchopt_ext.schedulefree_wrapper_post_(
            [p], [z], state, torch.tensor(0.1), weighting_mode="cosine", b1=0.9
        )
    with pytest.raises(ValueError, match="sf_state"):
        torch.ops.torchopt_ext.schedulefree_wrapper_pre_([p], [z], torch.zeros(4), torch.tensor(0.1))


def test_wrapper_is_an_optimizer_sharing_the_base_groups():
    p = torch.randn(3)
    base = torch.optim.SGD([p], lr=0.1)
    opt = tox.ScheduleFree(base)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups
    q = torch.randn(2)
    opt.add_param_group({"params": [q], "lr": 0.2})
    assert len(base.param_groups) == 2


def test_set_mode_and_wrapper_ops_pass_opcheck():
    from test_ops import OPCHECK_UTILS

    params = [torch.randn(4, 3), torch.randn(5), torch.randn(())]
    zs = [torch.randn_like(p) for p in params]
    state = torch.tensor([3.0, 0.5, 0.1, 0.9], dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64)
    ops = torch.ops.torchopt_ext
    torch.library.opcheck(
        ops.schedulefree_set_mode_.default, (params, zs), dict(beta=0.9, to_eval=True), test_utils=OPCHECK_UTILS
    )
    torch.library.opcheck(
        ops.schedulefree_wrapper_pre_.default,
        (params, zs, state, lr),
        dict(adamc_weight_decay=0.1),
        test_utils=OPCHECK_UTILS,
    )
    torch.library.opcheck(
        ops.schedulefree_wrapper_post_.default,
        (params, zs, state, lr),
        dict(weighting_mode="practical", b1=0.9),
        test_utils=OPCHECK_UTILS,
    )


def test_eval_train_round_trip_restores_y():
    ps = make_params([(50,)], torch.float64)
    opt = tox.ScheduleFreeSGD(ps, lr=0.1)
    for _ in range(5):
        ps[0].grad = torch.randn(50, dtype=torch.float64)
        opt.step()
    y = ps[0].clone()
    opt.eval()
    assert not torch.allclose(ps[0], y)
    opt.train()
    torch.testing.assert_close(ps[0], y, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "ours_cls, ref_cls, kwargs",
    [
        (tox.ScheduleFreeAdamW, schedulefree.AdamWScheduleFree, dict(lr=1e-2, warmup_steps=4, weight_decay=0.1)),
        (tox.ScheduleFreeSGD, schedulefree.SGDScheduleFree, dict(lr=0.05, r=0.5)),
    ],
)
def test_loads_a_schedulefree_package_checkpoint(ours_cls, ref_cls, kwargs, mode):
    dtype = torch.float64
    ps = make_params([(5, 3), (4,)], dtype)
    ref = ref_cls(ps, **kwargs)
    ref.train()
    grads = [[torch.randn_like(p) for p in ps] for _ in range(12)]
    for g in grads[:6]:
        for p, gi in zip(ps, g):
            p.grad = gi.clone()
        ref.step()
    if mode == "eval":
        ref.eval()
    saved = copy.deepcopy(ref.state_dict())  # state_dict() shares the live state tensors
    qs = [p.detach().clone() for p in ps]
    ours = ours_cls(qs, **kwargs)
    ours.load_state_dict(saved)
    assert all(group["train_mode"] == (mode == "train") for group in ours.param_groups)
    ref.train()
    ours.train()
    for g in grads[6:]:
        for p, q, gi in zip(ps, qs, g):
            p.grad = gi.clone()
            q.grad = gi.clone()
        ref.step()
        ours.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [tox.ScheduleFreeAdamW, tox.ScheduleFreeSGD])
def test_nan_gradient_poisons_only_its_element(cls):
    # As every torchopt_ext optimizer: NaN/Inf grads are applied as they are.
    p = torch.randn(40)
    opt = cls([p], lr=0.01)
    g = torch.randn(40)
    g[3] = float("nan")
    p.grad = g
    opt.step()
    assert torch.isnan(p[3]) and torch.isnan(opt.state[p]["z"][3])
    assert torch.isfinite(torch.cat([p[:3], p[4:]])).all()


@pytest.mark.parametrize("use_adamc", [False, True])
def test_schedule_free_adamw_convenience_matches_spec_with_wsd(use_adamc):
    # rollfast's schedule_free_adam: AdamW(b1=0) inside the wrapper, one WSD
    # schedule for the step size and the "practical" weights; the float64
    # reference gets AdamW's direction (+ lambda * y for decay at y) as its
    # "gradient", since it applies delta = -lr * g.
    torch.manual_seed(5)
    shapes, total, lr, wd, b2, eps = [(4, 3), (5,)], 30, 0.05, 0.1, 0.999, 1e-8
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    opt, sched = tox.schedule_free_adamw(
        params, lr, total, warmup_fraction=0.1, decay_fraction=0.2, weight_decay=wd, use_adamc=use_adamc
    )
    ref = ScheduleFreeSGDReference(
        params,
        lr=lambda k: lr * sched.lr_factor(k),
        weighting_mode="practical",
        adamc_weight_decay=wd if use_adamc else 0.0,
    )
    v = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for k in range(total):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        directions = []
        for i, g in enumerate(grads):
            v[i] = b2 * v[i] + (1 - b2) * g * g
            direction = g / (v[i].sqrt() / math.sqrt(1 - b2 ** (k + 1)) + eps)
            directions.append(direction if use_adamc else direction + wd * ref.y[i])
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
        ref.step(directions)
    for p, y in zip(params, ref.y):
        torch.testing.assert_close(p, y, rtol=1e-10, atol=1e-12)
    opt.eval()
    for p, x in zip(params, ref.x()):
        torch.testing.assert_close(p, x, rtol=1e-10, atol=1e-12)


# -- Schedule-Free+ Polyak scalar ------------------------------------------------

POLYAK_CASES = {
    "plain": dict(polyak=True),
    "ema_fstar": dict(polyak=True, polyak_beta=0.9, polyak_f_star=0.25),
    "anneal_adamc": dict(polyak=True, polyak_beta=0.5, b1_anneal_steps=6, b1_max=0.99, adamc_weight_decay=0.3),
}


@pytest.mark.parametrize("case", sorted(POLYAK_CASES))
def test_polyak_matches_spec_reference(case):
    dtype = torch.float64
    base_lr = 0.05
    torch.manual_seed(4)
    ps = make_params(WRAPPER_SHAPES, dtype)
    ref = ScheduleFreeSGDReference(ps, lr=lambda k: base_lr * _lr_factor(k), **POLYAK_CASES[case])
    ours = tox.ScheduleFree(torch.optim.SGD(ps, lr=base_lr), **POLYAK_CASES[case])
    sched = torch.optim.lr_scheduler.LambdaLR(ours, _lr_factor)
    rhos = []
    for k in range(STEPS):
        grads = [torch.randn_like(p) for p in ps]
        loss = 1.0 + 0.5 * math.sin(k)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        if k % 2:
            ours.step(loss=torch.tensor(loss, dtype=torch.float64))
        else:
            ours.step(lambda loss=loss: loss)  # closure form
        ref.step(grads, loss=loss)
        sched.step()
        rhos.append(ours.polyak_state[2].item())
        assert rhos[-1] == pytest.approx(ref.rho, rel=1e-12)
        for p, y in zip(ps, ref.y):
            torch.testing.assert_close(p, y, rtol=1e-12, atol=1e-12)
        # The base lr is the scheduler's again after the step.
        assert ours.param_groups[0]["lr"] == pytest.approx(base_lr * _lr_factor(k + 1), rel=1e-15)
    ours.eval()
    for p, x in zip(ps, ref.x()):
        torch.testing.assert_close(p, x, rtol=1e-12, atol=1e-12)
    assert len(set(round(r, 9) for r in rhos)) > STEPS // 2  # rho really varies (not stuck at 1)
    state = ours.param_groups[0]["sf_state"]
    assert state[2].item() == pytest.approx(ref.lr_max, rel=1e-14)
    assert state[1].item() == pytest.approx(ref.weight_sum, rel=1e-12)


def test_polyak_rho_is_zero_below_f_star_and_freezes_z():
    p = torch.randn(6, dtype=torch.float64)
    opt = tox.ScheduleFree(torch.optim.SGD([p], lr=0.1), polyak=True, polyak_f_star=10.0)
    p.grad = torch.randn(6, dtype=torch.float64)
    before = p.clone()
    opt.step(loss=1.0)  # f - f* < 0 and z = y at the first step: rho = 0
    assert opt.polyak_state[2].item() == 0.0
    assert torch.equal(p, before)


def test_polyak_needs_the_loss():
    p = torch.randn(3)
    opt = tox.ScheduleFree(torch.optim.SGD([p], lr=0.1), polyak=True)
    p.grad = torch.randn(3)
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_polyak_checkpoint_resumes_bitwise_in_both_modes(mode):
    torch.manual_seed(8)
    shapes = [(5, 3), (4,)]
    params = make_params(shapes, torch.float32)
    grads = [[torch.randn_like(p) for p in params] for _ in range(12)]

    def make(ps):
        return tox.ScheduleFree(tox.AdamW(ps, lr=1e-2), polyak=True, polyak_beta=0.8, b1_anneal_steps=4)

    def run(opt, ps, gs, start):
        for k, g in enumerate(gs):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step(loss=2.0 + start + k)

    opt = make(params)
    run(opt, params, grads[:6], 0)
    if mode == "eval":
        opt.eval()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    opt.train()
    run(opt, params, grads[6:], 6)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [p.clone() for p in saved["params"]]
    resumed = make(resumed_params)
    resumed.load_state_dict(saved["opt"])
    assert torch.equal(resumed.polyak_state, saved["opt"]["polyak_state"])
    resumed.train()
    run(resumed, resumed_params, grads[6:], 6)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))
    assert torch.equal(opt.polyak_state, resumed.polyak_state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(polyak_beta=1.0), "polyak_beta"),
        (dict(polyak_eps=0.0), "polyak_eps"),
        (dict(lr_max_init=-1.0), "lr_max_init"),
        (dict(polyak_f_star=float("nan")), "polyak_f_star"),
    ],
)
def test_wrapper_rejects_bad_sf_plus_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.ScheduleFree(torch.optim.SGD([torch.randn(2)], lr=0.1), **kwargs)


def test_polyak_op_passes_opcheck():
    params = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    args = (
        params,
        [torch.randn_like(p) for p in params],
        [p + 0.1 for p in params],
        torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64),
        torch.tensor(1.5),
        torch.tensor([2.0, 0.1, 0.1, 0.9], dtype=torch.float64),
    )
    torch.library.opcheck(
        torch.ops.torchopt_ext.schedulefree_polyak_.default,
        args,
        dict(b1=0.9, polyak_beta=0.5),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


# -- schedule_free_prism -----------------------------------------------------------


@pytest.mark.parametrize("use_adamc", [False, True])
def test_schedule_free_prism_convenience_matches_spec(use_adamc):
    # rollfast's schedule_free_prism: PRISM(b1 = 0, no Nesterov) with an AdamW
    # fallback (b1 = 0) at its own peak lr, one WSD shape for both groups, the
    # wrapper weighting and decaying each group with its own lr. References:
    # the float64 PRISM branch (run at lr 1 on stand-ins to get clip(O)),
    # AdamW's direction written out, and one float64 wrapper per group.
    from reference.prism import PrismReference

    torch.manual_seed(6)
    shapes, total, lr, adam_lr, wd, b2, eps = [(6, 4), (5,), (4, 6), ()], 24, 0.02, 0.005, 0.1, 0.999, 1e-8
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    opt, sched = tox.schedule_free_prism(
        params,
        lr,
        total,
        decay_fraction=0.25,
        weight_decay=wd,
        adam_lr=adam_lr,
        use_adamc=use_adamc,
        ns_dtype=torch.float64,
    )
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * sched.lr_factor(0), adam_lr * sched.lr_factor(0)])
    mats = [i for i, p in enumerate(params) if p.dim() == 2]
    vecs = [i for i, p in enumerate(params) if p.dim() != 2]
    decay = dict(adamc_weight_decay=wd if use_adamc else 0.0)
    ref_m = ScheduleFreeSGDReference([params[i] for i in mats], lr=lambda k: lr * sched.lr_factor(k), **decay)
    ref_v = ScheduleFreeSGDReference([params[i] for i in vecs], lr=lambda k: adam_lr * sched.lr_factor(k), **decay)
    stand_ins = [torch.zeros(shapes[i], dtype=torch.float64) for i in mats]
    prism = PrismReference(stand_ins, lr=1.0, b1=0.0, nesterov=False)
    v = [torch.zeros(shapes[i], dtype=torch.float64) for i in vecs]
    for k in range(total):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        before = [t.clone() for t in stand_ins]
        for t, i in zip(stand_ins, mats):
            t.grad = grads[i].clone()
        prism.step()
        dir_m = [b - t for b, t in zip(before, stand_ins)]
        dir_v = []
        for j, i in enumerate(vecs):
            v[j] = b2 * v[j] + (1 - b2) * grads[i] * grads[i]
            dir_v.append(grads[i] / (v[j].sqrt() / math.sqrt(1 - b2 ** (k + 1)) + eps))
        if not use_adamc:
            dir_m = [d + wd * y for d, y in zip(dir_m, ref_m.y)]
            dir_v = [d + wd * y for d, y in zip(dir_v, ref_v.y)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
        ref_m.step(dir_m)
        ref_v.step(dir_v)
    for i, y in zip(mats + vecs, ref_m.y + ref_v.y):
        torch.testing.assert_close(params[i], y, rtol=1e-10, atol=1e-12)
    opt.eval()
    for i, x in zip(mats + vecs, ref_m.x() + ref_v.x()):
        torch.testing.assert_close(params[i], x, rtol=1e-10, atol=1e-12)


def test_sf_plus_knobs_inherit_schedule_free_plus():
    ps = [torch.randn(4, 3), torch.randn(3)]
    opt, _ = tox.schedule_free_prism(ps, 0.01, 10, schedule_free_plus=True, weight_decay=0.1)
    assert opt.defaults["polyak"] and opt.defaults["use_lr_max"]
    assert opt.defaults["adamc_weight_decay"] == 0.1 and opt.defaults["weight_decay_at_y"] == 0.0
    assert opt.base_optimizer.param_groups[1]["adam_betas"] == (0.9, 0.95)
    opt, _ = tox.schedule_free_prism(ps, 0.01, 10, schedule_free_plus=True, polyak=False, use_adamc=False)
    assert not opt.defaults["polyak"] and opt.defaults["use_lr_max"] and opt.defaults["adamc_weight_decay"] == 0.0
    opt, _ = tox.schedule_free_adamw(ps, 0.01, 10, schedule_free_plus=True, sf_b1_anneal_steps=5)
    assert opt.base_optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert opt.defaults["b1_anneal_steps"] == 5 and opt.defaults["lr_max_init"] == 1e-8
    plain, _ = tox.schedule_free_adamw(ps, 0.01, 10)
    assert plain.base_optimizer.param_groups[0]["betas"] == (0.0, 0.999) and not plain.defaults["polyak"]


def test_schedule_free_prism_polyak_runs_with_the_loss():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, target = torch.randn(32, 5), torch.randn(32, 1)
    opt, sched = tox.schedule_free_prism(model.parameters(), 0.02, 20, schedule_free_plus=True)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(20):
        opt.step(closure)
        sched.step()
    opt.eval()
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(model(x), target).item() < first
    assert opt.polyak_state[1].item() == 20


def test_schedule_free_prism_rejects_what_it_sets():
    with pytest.raises(TypeError, match="nesterov"):
        tox.schedule_free_prism([torch.randn(3, 3)], 0.01, 10, nesterov=True)


# -- schedule_free_kron ------------------------------------------------------------


@pytest.mark.parametrize("use_adamc", [False, True])
def test_schedule_free_kron_is_the_composition(use_adamc):
    # rollfast's schedule_free_kron: ScheduleFree(Kron(b1 = 0, whiten_grad,
    # no decay)) + one WSD; equal, bitwise, to that composition built by hand.
    torch.manual_seed(4)
    shapes, total, lr, wd = [(6, 4), (5,), (3, 2, 4)], 16, 0.01, 0.1
    a = [torch.randn(s) for s in shapes]
    b = [t.clone() for t in a]
    made, made_sched = tox.schedule_free_kron(
        a, lr, total, decay_fraction=0.25, weight_decay=wd, use_adamc=use_adamc, seed=3, preconditioner_mode="QUAD"
    )
    base = tox.Kron(b, lr=lr, b1=0.0, seed=3, preconditioner_mode="QUAD")
    manual = tox.ScheduleFree(
        base,
        weighting_mode="practical",
        weight_decay_at_y=0.0 if use_adamc else wd,
        adamc_weight_decay=wd if use_adamc else 0.0,
    )
    from torchopt_ext.schedules import WSD

    manual_sched = WSD(manual, total, 0.1, 0.25)
    assert made.base_optimizer.param_groups[0]["b1"] == 0.0
    for _ in range(total):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        made.step()
        made_sched.step()
        manual.step()
        manual_sched.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    made.eval()
    manual.eval()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_schedule_free_kron_rejects_what_it_sets():
    with pytest.raises(TypeError, match="whiten_grad"):
        tox.schedule_free_kron([torch.randn(3, 3)], 0.01, 10, whiten_grad=False)
