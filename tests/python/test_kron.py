"""PSGD Kron: parity with the float64 reference written from rollfast.md §2
(tests/reference/kron.py, same generator draws), every geometry, factor
layouts, gates, clipping and spike skips, bf16 storage, Magma, errors, and
convergence against AdamW."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference.kron import KronReference, layout

import torchopt_ext.optim as tox

MODES = ["Q0.5EQ1.5", "EQ", "QUAD", "NS", "EXP", "TAYLOR2", "HYPER"]
# 0-d, 1-D, square, wide, tall, 3-D and 4-D: scalar, diagonal, dense and mixed layouts.
SHAPES = [(), (7,), (6, 6), (5, 9), (9, 4), (3, 4, 5), (2, 3, 2, 4)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _run(shapes, dtype, steps=20, seed=7, grad_scale=1.0, **kwargs):
    """Max |ours - reference| over all params and steps, and both sides' params."""
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes]
    ref = [p.detach().clone().to(torch.float64) for p in ours]
    opt = tox.Kron(ours, seed=seed, **kwargs)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    reference = KronReference(ref, seed=seed, draw_dtype=draw, **kwargs)
    err = 0.0
    for _ in range(steps):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, dtype=dtype, generator=gen) * grad_scale
            p.grad = g.clone()
            q.grad = g.to(torch.float64)
        opt.step()
        reference.step()
        err = max(err, max(float((a.double() - b).abs().max()) for a, b in zip(ours, ref)))
    return err, ours, ref, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_every_geometry_matches_reference(mode, dtype):
    err, ours, ref, _ = _run(SHAPES, dtype, lr=0.01, preconditioner_mode=mode)
    assert err <= TOL[dtype], f"{mode} {dtype}: max error {err}"


def test_geometries_differ():
    # Each mode's factor update is its own: the parity above cannot pass by
    # all modes collapsing onto one rule (compared on the factors, which the
    # modes move apart at first order: >= 1e-5 here vs the 1e-12 tolerance).
    finals = {}
    for mode in MODES:
        opt = _run([(6, 6), (3, 4, 5)], torch.float64, steps=5, lr=0.05, preconditioner_mode=mode)[3]
        finals[mode] = torch.cat([s["Q"] for s in opt.state.values()])
    for a in MODES:
        for b in MODES:
            if a < b:
                assert (finals[a] - finals[b]).abs().max() > 1e-6, (a, b)


def test_mode_alias_is_the_same_geometry():
    a = _run([(6, 6)], torch.float64, steps=5, preconditioner_mode="Q0.5EQ1.5")[1]
    b = _run([(6, 6)], torch.float64, steps=5, preconditioner_mode="Q0p5EQ1p5")[1]
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(memory_save_mode="one_diag"),
        dict(memory_save_mode="all_diag"),
        dict(max_size_triangular=5),
        dict(max_skew_triangular=0.3),
        dict(min_ndim_triangular=3),
        dict(whiten_grad=False),
        dict(update_preconditioner_first=False),
        dict(b1=0.0),
        dict(preconditioner_init_scale=0.5),
        dict(track_lipschitz=False),
        dict(beta_lipschitz=0.5, preconditioner_lr=0.3, damping=1e-4),
        dict(preconditioner_update_probability=0.4),
        dict(preconditioner_update_probability=tox.precond_update_prob_schedule(flat_start=5, decay=0.2)),
        dict(weight_decay=0.3),
        dict(grad_clip_mode="global_rms", grad_clip_max_amps=(0.5, 10.0)),
        dict(grad_clip_max_amps=(0.3, 0.02)),
        dict(grad_clip_max_amps=None),
    ],
    ids=lambda kw: ",".join(f"{k}={v if not callable(v) else 'schedule'}" for k, v in kw.items()),
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_options_match_reference(kwargs, dtype):
    err, *_ = _run(SHAPES, dtype, steps=20, lr=0.01, **kwargs)
    assert err <= TOL[dtype], f"{kwargs}: max error {err}"


def test_maximize_negates_the_gradient():
    p, q = torch.randn(5, 4, dtype=torch.float64), None
    q = p.clone()
    a = tox.Kron([p], lr=0.02, maximize=True, seed=1)
    b = tox.Kron([q], lr=0.02, seed=1)
    for _ in range(5):
        g = torch.randn(5, 4, dtype=torch.float64)
        p.grad, q.grad = g.clone(), -g
        a.step()
        b.step()
    assert torch.equal(p, q)


def test_layout_follows_rollfast_rules():
    kron = torch.ops.torchopt_ext.kron_factor_layout
    cases = {
        (): [0],
        (7,): [0],
        (6, 6): [1, 1],
        (5, 9): [1, 0],  # m < n: dense m x m, diagonal on the larger axis
        (1, 8): [0, 0],
        (3, 4, 5): [1, 1, 1],
    }
    for shape, expected in cases.items():
        assert list(kron(list(shape))) == expected, shape
        assert [int(x) for x in layout(shape)] == expected
    assert list(kron([6, 6], memory_save_mode="one_diag")) == [1, 0]
    assert list(kron([6, 7], memory_save_mode="one_diag")) == [1, 0]
    assert list(kron([6, 6], memory_save_mode="all_diag")) == [0, 0]
    assert list(kron([6, 6], max_size_triangular=5)) == [0, 0]
    assert list(kron([6, 6], min_ndim_triangular=3)) == [0, 0]
    p = torch.randn(5, 9)
    p.grad = torch.randn(5, 9)
    opt = tox.Kron([p])
    opt.step()
    assert opt.state[p]["Q"].shape == (25 + 9,)
    assert opt.state[p]["L"].shape == (2,)
    with pytest.raises(ValueError, match="at most 13"):
        kron([1] * 14)


def test_factors_initialize_on_first_step():
    p = torch.randn(4, 4, dtype=torch.float64)
    p.grad = torch.randn(4, 4, dtype=torch.float64)
    opt = tox.Kron([p], preconditioner_init_scale=4.0, preconditioner_update_probability=0.0, seed=0)
    opt.step()
    q = opt.state[p]["Q"]
    # No update (p = 0): each of the two factors is sqrt(4) I.
    torch.testing.assert_close(q, torch.cat([2 * torch.eye(4).flatten(), 2 * torch.eye(4).flatten()]).double())


def test_generator_is_reproducible_and_per_optimizer():
    def run(seed):
        torch.manual_seed(0)
        p = torch.randn(6, 5)
        opt = tox.Kron([p], lr=0.01, seed=seed)
        for _ in range(5):
            p.grad = torch.randn(6, 5)
            opt.step()
        return p

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    # The global generator is not consumed by the step.
    torch.manual_seed(5)
    p = torch.randn(3, 3)
    p.grad = torch.randn(3, 3)
    opt = tox.Kron([p], seed=1)
    expected = torch.rand(4)
    torch.manual_seed(5)
    torch.randn(3, 3), torch.randn(3, 3)
    opt.step()
    assert torch.equal(torch.rand(4), expected)


def test_groups_share_one_generator():
    torch.manual_seed(0)
    a, b = torch.randn(4, 3), torch.randn(5)
    opt = tox.Kron([{"params": [a]}, {"params": [b], "lr": 0.02}], lr=0.01, seed=2)
    assert opt.param_groups[0]["rng_state"] is opt.param_groups[1]["rng_state"]
    c = torch.randn(2, 2)
    opt.add_param_group({"params": [c]})
    assert opt.param_groups[2]["rng_state"] is opt.param_groups[0]["rng_state"]
    before = opt.param_groups[0]["rng_state"].clone()
    a.grad, b.grad = torch.randn(4, 3), torch.randn(5)
    opt.step()
    assert not torch.equal(before, opt.param_groups[1]["rng_state"])


def test_update_gate_zero_keeps_factors():
    p = torch.randn(5, 5)
    opt = tox.Kron([p], preconditioner_update_probability=0.0, seed=0)
    p.grad = torch.randn(5, 5)
    opt.step()
    q0 = opt.state[p]["Q"].clone()
    for _ in range(3):
        p.grad = torch.randn(5, 5)
        opt.step()
    assert torch.equal(opt.state[p]["Q"], q0)
    assert torch.equal(opt.state[p]["L"], torch.zeros(2))


def test_raw_clip_permissive_clips_and_continues_matching_reference():
    err, *_ = _run(SHAPES, torch.float64, steps=10, lr=0.01, raw_global_grad_clip=3.0, grad_scale=2.0)
    assert err <= 1e-12


@pytest.mark.parametrize("permissive,probability", [(False, None), (True, 0.5)])
def test_spike_skip_leaves_whole_state_untouched(permissive, probability):
    torch.manual_seed(0)
    ps = [torch.randn(4, 3), torch.randn(5), torch.randn(())]
    opt = tox.Kron(
        ps,
        lr=0.05,
        raw_global_grad_clip=5.0,
        permissive_spike_protection=permissive,
        preconditioner_update_probability=probability,
        use_magma=True,
        seed=0,
    )
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p) * 0.1
        opt.step()
    params = [p.clone() for p in ps]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(ps)}
    rng = opt.param_groups[0]["rng_state"].clone()
    for p in ps:
        p.grad = torch.randn_like(p) * 100.0  # spike
    opt.step()
    for p, before in zip(ps, params):
        assert torch.equal(p, before)
    for i, p in enumerate(ps):
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[i][k]), k
    assert torch.equal(opt.param_groups[0]["rng_state"], rng)
    # The next normal step proceeds as if the spike never happened.
    grads = [torch.randn_like(p) * 0.1 for p in ps]
    ref_params = [p.clone() for p in ps]
    ref = tox.Kron(
        ref_params,
        lr=0.05,
        raw_global_grad_clip=5.0,
        permissive_spike_protection=permissive,
        preconditioner_update_probability=probability,
        use_magma=True,
        seed=0,
    )
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q, g in zip(ps, ref_params, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    for p, q in zip(ps, ref_params):
        assert torch.equal(p, q)


def test_spike_skip_matches_reference_over_a_run():
    # Strict protection: spikes on some steps are skipped by both sides.
    gen = torch.Generator().manual_seed(1)
    ours = [torch.randn(s, dtype=torch.float64, generator=gen) for s in [(5, 4), (6,)]]
    ref = [p.clone() for p in ours]
    opt = tox.Kron(ours, lr=0.02, raw_global_grad_clip=4.0, permissive_spike_protection=False, seed=2)
    reference = KronReference(
        ref, lr=0.02, raw_global_grad_clip=4.0, permissive_spike_protection=False, seed=2, draw_dtype=torch.float64
    )
    skipped = 0
    for k in range(20):
        scale = 3.0 if k % 4 == 3 else 0.3
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, dtype=torch.float64, generator=gen) * scale
            p.grad, q.grad = g.clone(), g.clone()
        before = ours[0].clone()
        opt.step()
        reference.step()
        skipped += torch.equal(before, ours[0])
    assert skipped == 5
    assert opt.state[ours[0]]["step"].item() == 15
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bf16_storage_uses_fp32_math_and_tracks_fp32_run():
    def run(**kwargs):
        torch.manual_seed(0)
        p = torch.randn(8, 6)
        opt = tox.Kron([p], lr=0.01, seed=4, **kwargs)
        for _ in range(20):
            p.grad = torch.randn(8, 6)
            opt.step()
        return p, opt

    base, _ = run()
    low, opt = run(mu_dtype=torch.bfloat16, precond_dtype=torch.bfloat16)
    state = opt.state[low]
    assert state["mu"].dtype == torch.bfloat16 and state["Q"].dtype == torch.bfloat16
    assert state["L"].dtype == torch.float32
    # bf16 keeps ~3 significant digits: close to the fp32 run, not equal.
    assert 0 < (low - base).abs().max() < 2e-3
    again, _ = run(mu_dtype=torch.bfloat16, precond_dtype=torch.bfloat16)
    assert torch.equal(low, again)


def test_bf16_momentum_is_stochastically_rounded():
    # Stored values average to the fp32 value (round-to-nearest would be biased).
    p = torch.zeros(64, 64)
    opt = tox.Kron([p], lr=0.0, b1=0.5, mu_dtype=torch.bfloat16, seed=0, preconditioner_update_probability=0.0)
    target = torch.full((64, 64), 1.0 + 2.0**-10)  # between two bf16 values
    p.grad = target.clone()
    opt.step()
    mu = opt.state[p]["mu"].float()
    assert set(mu.unique().tolist()) == {1.0, 1.0078125}
    assert abs(mu.mean().item() - target[0, 0].item()) < 2e-4


def test_bf16_params():
    # Same start and grads (bf16-representable): only the param storage differs.
    torch.manual_seed(0)
    p16 = torch.randn(6, 5).to(torch.bfloat16)
    p32 = p16.float()
    a = tox.Kron([p32], lr=0.01, seed=1)
    b = tox.Kron([p16], lr=0.01, seed=1, stochastic_rounding=True)
    for _ in range(10):
        g = torch.randn(6, 5).to(torch.bfloat16)
        p32.grad, p16.grad = g.float(), g.clone()
        a.step()
        b.step()
    assert b.state[p16]["Q"].dtype == torch.float32
    # A few bf16 ulps (2^-7 relative) of rounding noise, not a different trajectory.
    assert ((p16.float() - p32).abs() <= 3 * 2**-7 * p32.abs().clamp_min(0.1)).all()


def test_magma_masks_and_scores():
    torch.manual_seed(0)
    p = torch.randn(5, 4, dtype=torch.float64)
    before = p.clone()
    opt = tox.Kron([p], lr=0.1, weight_decay=0.5, use_magma=True, magma_p=0.0, seed=1)
    for _ in range(3):
        p.grad = torch.randn(5, 4, dtype=torch.float64)
        opt.step()
    # p = 0: every update (decay included) is dropped, the score still moves.
    assert torch.equal(p, before)
    assert opt.state[p]["magma_score"].item() != 0.5
    q = before.clone()
    opt = tox.Kron([q], lr=0.1, use_magma=True, magma_p=1.0, seed=1)
    plain_q = before.clone()
    plain = tox.Kron([plain_q], lr=0.1, seed=1)
    g = torch.randn(5, 4, dtype=torch.float64)
    q.grad, plain_q.grad = g.clone(), g.clone()
    opt.step()
    plain.step()
    # Always kept: the update is the plain one scaled by the score s in (0, 1).
    s = opt.state[q]["magma_score"].item()
    torch.testing.assert_close(q - before, (plain_q - before) * s, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(preconditioner_mode="QEQ"), "preconditioner_mode"),
        (dict(b1=1.0), "b1"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(memory_save_mode="some_diag"), "memory_save_mode"),
        (dict(grad_clip_mode="rms"), "grad_clip_mode"),
        (dict(grad_clip_max_amps=(0.0, 1.0)), "grad_clip_max_amps"),
        (dict(raw_global_grad_clip=0.0), "raw_global_grad_clip"),
        (dict(preconditioner_lr=0.0), "preconditioner_lr"),
        (dict(preconditioner_init_scale=-1.0), "preconditioner_init_scale"),
        (dict(preconditioner_update_probability=1.5), "preconditioner_update_probability"),
        (dict(beta_lipschitz=1.0), "beta_lipschitz"),
        (dict(damping=-1.0), "damping"),
        (dict(newton_schulz_iters=0), "newton_schulz_iters"),
        (dict(whiten_grad=False, b1=0.0), "whiten_grad"),
        (dict(use_magma=True, b1=0.0), "use_magma"),
        (dict(magma_p=2.0), "magma_p"),
        (dict(max_size_triangular=-1), "max_size_triangular"),
        (dict(mu_dtype=torch.int32), "state_dtype"),
    ],
)
def test_bad_options_are_rejected_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.Kron([torch.randn(3, 3)], **kwargs)


def test_op_rejects_bad_input_by_name():
    p = torch.randn(4, 4)
    p.grad = torch.randn(4, 4)
    opt = tox.Kron([p], seed=0)
    opt.step()
    state = opt.state[p]
    kw = opt._op_kwargs(opt.param_groups[0])
    lr = torch.tensor(0.01, dtype=torch.float64)
    op = torch.ops.torchopt_ext.kron_step_
    with pytest.raises(ValueError, match="preconditioners\\[0\\]"):
        op([p], [p.grad], [state["mu"]], [torch.zeros(5)], [state["L"]], [], [state["step"]], lr, **kw)
    with pytest.raises(ValueError, match="lipschitz\\[0\\]"):
        op([p], [p.grad], [state["mu"]], [state["Q"]], [torch.zeros(3)], [], [state["step"]], lr, **kw)
    with pytest.raises(ValueError, match="preconditioner_mode"):
        op(
            [p],
            [p.grad],
            [state["mu"]],
            [state["Q"]],
            [state["L"]],
            [],
            [state["step"]],
            lr,
            **dict(kw, preconditioner_mode="nope"),
        )
    with pytest.raises(ValueError, match="rng_state"):
        op(
            [p],
            [p.grad],
            [state["mu"]],
            [state["Q"]],
            [state["L"]],
            [],
            [state["step"]],
            lr,
            **dict(kw, rng_state=torch.zeros(3)),
        )


def test_nan_grads_propagate():
    p = torch.randn(4, 3)
    opt = tox.Kron([p], seed=0, raw_global_grad_clip=1.0)
    p.grad = torch.full((4, 3), float("nan"))
    opt.step()  # a NaN norm is no spike: the step runs and the NaN spreads
    assert torch.isnan(p).all()


def test_step_compiles_with_callable_schedule():
    torch._dynamo.reset()

    def run(compiled):
        torch.manual_seed(0)
        p = torch.randn(6, 4)
        opt = tox.Kron(
            [p],
            lr=0.01,
            seed=3,
            preconditioner_update_probability=tox.precond_update_prob_schedule(flat_start=1, decay=0.5),
        )
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for _ in range(4):
            p.grad = torch.randn(6, 4)
            step()
        return p, opt

    eager, e_opt = run(False)
    compiled, c_opt = run(True)
    assert torch.equal(eager, compiled)
    assert torch.equal(e_opt.state[eager]["Q"], c_opt.state[compiled]["Q"])


def test_lr_scheduler_and_closure():
    p = torch.randn(4, 3)
    opt = tox.Kron([p], lr=0.1, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        p.grad = torch.ones_like(p)
        return torch.tensor(1.0)

    assert opt.step(closure).item() == 1.0
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05


def _quadratic(dim=20, cond=1e3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    eig = torch.logspace(0, math.log10(cond), dim)
    H = basis @ torch.diag(eig) @ basis.T
    return H


def test_converges_faster_than_adamw_on_ill_conditioned_quadratic():
    # 0.5 x^T H x over a (20, 20) matrix parameter, H acting on its rows: a
    # Kronecker-structured curvature Kron can whiten and Adam's diagonal cannot.
    H = _quadratic()

    def loss(w):
        return 0.5 * torch.einsum("ij,ik,kj->", w, H, w) / w.shape[1]

    def run(make):
        torch.manual_seed(1)
        w = torch.randn(20, 20, requires_grad=True)
        opt = make([w])
        for _ in range(200):
            opt.zero_grad()
            loss(w).backward()
            opt.step()
        return loss(w).item()

    grid = (0.003, 0.01, 0.03, 0.1)
    kron = min(run(lambda ps, lr=lr: tox.Kron(ps, lr=lr, seed=0)) for lr in grid)
    adamw = min(run(lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0)) for lr in grid)
    assert kron < adamw, (kron, adamw)


def test_converges_faster_than_adamw_on_small_mlp():
    # Noise-free regression with a 2-hidden-layer tanh MLP; each optimizer at
    # its best lr of the same grid (Kron ~1.5e-4 at 0.01, AdamW ~4e-4 at 0.1).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = torch.sin(x @ torch.randn(8, 1, generator=gen))

    def run(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        opt = make(model.parameters())
        for _ in range(150):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        return torch.nn.functional.mse_loss(model(x), y).item()

    grid = (0.003, 0.01, 0.03, 0.1)
    kron = min(run(lambda ps, lr=lr: tox.Kron(ps, lr=lr, seed=0)) for lr in grid)
    adamw = min(run(lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0)) for lr in grid)
    assert kron < adamw, (kron, adamw)


# -- stacked (scanned) layers ---------------------------------------------------

# (L, ...) params: dense/dense, 1-D slices (diagonal), 3-D slices and one layer.
STACKED_SHAPES = [(3, 5, 4), (4, 6), (2, 3, 2, 4), (1, 4, 4)]


def _stacked_vs_separate(dtype, steps=20, **kwargs):
    """A stacked optimizer over STACKED_SHAPES and Kron over every slice as its
    own param (slices in order), fed the same grads: both optimizers."""
    gen = torch.Generator().manual_seed(1)
    stacked = [torch.randn(s, dtype=dtype, generator=gen) for s in STACKED_SHAPES]
    separate = [p[i].clone() for p in stacked for i in range(p.shape[0])]
    opt = tox.Kron(stacked, stacked=True, **kwargs)
    kwargs.pop("stacked_chunk_size", None)
    ref = tox.Kron(separate, **kwargs)
    for _ in range(steps):
        for p in stacked:
            p.grad = torch.randn(p.shape, dtype=dtype, generator=gen)
        for q, g in zip(separate, [p.grad[i].clone() for p in stacked for i in range(p.shape[0])]):
            q.grad = g
        opt.step()
        ref.step()
    return stacked, separate, opt, ref


def _stacked_error(stacked, separate, opt, ref, kwargs, steps=20):
    """Max |diff| of params and every state tensor, slice by slice, relative
    to the tensor's magnitude when that exceeds 1 (the Lipschitz EMAs reach
    ~30)."""
    keys = ["Q", "L", "mu"] + (["magma_score"] if kwargs.get("use_magma") else [])
    k, err = 0, 0.0
    for p in stacked:
        state = opt.state[p]
        assert state["step"].shape == () and float(state["step"]) == steps
        assert state["Q"].shape[0] == p.shape[0] and state["L"].shape[0] == p.shape[0]
        for i in range(p.shape[0]):
            other = ref.state[separate[k]]
            err = max(err, float((p[i] - separate[k]).abs().max()))
            for key in keys:
                a, b = state[key][i].double(), other[key].double()
                err = max(err, float((a - b).abs().max()) / max(1.0, float(b.abs().max())))
            k += 1
    return err


@pytest.mark.parametrize("chunk", [None, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.02, seed=4),  # the default update schedule: the gate draw is shared
        dict(lr=0.02, seed=4, use_magma=True, weight_decay=0.1, preconditioner_update_probability=0.5),
        dict(lr=0.02, seed=4, preconditioner_mode="EQ", grad_clip_mode="global_rms", raw_global_grad_clip=50.0),
    ],
)
def test_stacked_equals_separate_slices(dtype, kwargs, chunk):
    kwargs = dict(kwargs, stacked_chunk_size=chunk)
    stacked, separate, opt, ref = _stacked_vs_separate(dtype, **kwargs)
    kwargs.pop("stacked_chunk_size")
    # Same math and draws in the same order (the batch draws per slice); only
    # rounding differs: a batched matmul (bmm) of a slice does not round like
    # the mm of the separate param, even in a batch of one (measured over 20
    # steps, every chunk size: params 2.2e-16 fp64 / 1.2e-7 fp32, state
    # relative 5.1e-16 / 1.3e-7).
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}[dtype]
    err = _stacked_error(stacked, separate, opt, ref, kwargs)
    print(f"stacked (chunk {chunk}) vs separate, {dtype}: max |diff| = {err:.3e}")
    assert err <= tol, err
    # One gate draw per step and the same noise / probe draws: the generators agree.
    assert torch.equal(opt.param_groups[0]["rng_state"], ref.param_groups[0]["rng_state"])
    # The slices' preconditioners did move apart.
    assert (opt.state[stacked[0]]["Q"][0] - opt.state[stacked[0]]["Q"][1]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["EQ", "Q0.5EQ1.5", "QUAD", "NS", "EXP", "TAYLOR2", "HYPER"])
def test_stacked_batches_every_geometry(mode):
    # Every geometry's batched factor update (bmm, batched solves / matrix
    # exponential / norm bounds) equals the per-slice one; chunks of 2
    # split the L = 3 and L = 4 params unevenly. (The batched balancing is
    # checked in tests/cpp/test_kron.cpp: its 1% gate rarely opens here.)
    kwargs = dict(lr=0.02, seed=9, preconditioner_mode=mode, preconditioner_update_probability=1.0)
    stacked, separate, opt, ref = _stacked_vs_separate(torch.float64, steps=30, stacked_chunk_size=2, **kwargs)
    err = _stacked_error(stacked, separate, opt, ref, kwargs, steps=30)
    print(f"{mode}: stacked vs separate max |diff| = {err:.3e}")
    assert err <= 1e-12, (mode, err)
    assert torch.equal(opt.param_groups[0]["rng_state"], ref.param_groups[0]["rng_state"])


@pytest.mark.parametrize("chunk", [0, -1, 1.5, True])
def test_stacked_chunk_size_is_validated(chunk):
    with pytest.raises(ValueError, match="stacked_chunk_size"):
        tox.Kron([torch.randn(3, 4, 4)], stacked=True, stacked_chunk_size=chunk)
    # The op checks it too (C++ callers and direct op calls).
    p = torch.randn(3, 4, 4)
    with pytest.raises((ValueError, RuntimeError), match="stacked_chunk_size"):
        torch.ops.torchopt_ext.kron_step_(
            [p],
            [torch.randn(3, 4, 4)],
            [torch.zeros(3, 4, 4)],
            [torch.zeros(3, 32)],
            [torch.zeros(3, 2)],
            [],
            [torch.tensor(0.0)],
            torch.tensor(0.01, dtype=torch.float64),
            rng_state=torch.Generator().get_state(),
            stacked=True,
            stacked_chunk_size=0 if not isinstance(chunk, int) or isinstance(chunk, bool) else chunk,
        )


def test_stacked_differs_from_one_preconditioner_per_param():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen)
    a, b = p.clone(), p.clone()
    opt_a = tox.Kron([a], lr=0.05, seed=1, stacked=True)
    opt_b = tox.Kron([b], lr=0.05, seed=1)
    for _ in range(5):
        g = torch.randn(p.shape, dtype=torch.float64, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    # (4, 5) slices: 5^2 > 20 elements makes the last factor diagonal (max_skew_triangular=1).
    assert opt_a.state[a]["Q"].shape == (3, 16 + 5) and opt_b.state[b]["Q"].shape == (9 + 16 + 25,)
    assert (a - b).abs().max() > 1e-6


@pytest.mark.parametrize("shape", [(5,), ()])
def test_stacked_rejects_params_without_a_layer_axis(shape):
    with pytest.raises(ValueError, match="stacked"):
        tox.Kron([torch.randn(shape)], stacked=True)
    opt = tox.Kron([torch.randn(3, 3)], stacked=True)
    with pytest.raises(ValueError, match="stacked"):
        opt.add_param_group({"params": [torch.randn(shape)]})
    with pytest.raises(ValueError, match="stacked"):
        tox.Kron([torch.randn(3, 3)], stacked=1)


def test_stacked_state_dict_round_trip():
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(3, 5, 4, generator=gen), torch.randn(2, 6, generator=gen)]
    plain = torch.randn(4, 4, generator=gen)
    kwargs = dict(lr=0.02, seed=6, use_magma=True, preconditioner_update_probability=0.6, mu_dtype=torch.bfloat16)
    opt = tox.Kron([{"params": params, "stacked": True}, {"params": [plain]}], **kwargs)
    grads = [[torch.randn(p.shape, generator=gen) for p in [*params, plain]] for _ in range(8)]

    def run(ps, o, steps):
        for step in steps:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            o.step()

    run([*params, plain], opt, grads[:4])
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["Q"].shape == (3, 5 + 16)  # (5, 4) slices: a diagonal 5, a dense 4 x 4
    assert saved["state"][1]["L"].shape == (2, 1)
    assert saved["state"][0]["magma_score"].shape == (3,)
    assert saved["state"][2]["magma_score"].shape == ()
    assert saved["param_groups"][0]["stacked"] and not saved["param_groups"][1]["stacked"]
    resumed_params = [p.detach().clone() for p in [*params, plain]]
    resumed = tox.Kron(
        [{"params": resumed_params[:2], "stacked": True}, {"params": resumed_params[2:]}], lr=0.5, seed=0
    )
    resumed.load_state_dict(saved)
    run([*params, plain], opt, grads[4:])
    run(resumed_params, resumed, grads[4:])
    for a, b in zip([*params, plain], resumed_params):
        assert torch.equal(a, b)
    # A checkpoint of unstacked state does not fit a stacked group.
    unstacked = tox.Kron([q.detach().clone() for q in params[:1]], lr=0.02)
    with pytest.raises(ValueError, match="state 'Q' has shape"):
        unstacked.load_state_dict(
            {**saved, "param_groups": [{**saved["param_groups"][1], "params": [0]}], "state": {0: saved["state"][0]}}
        )


def test_stacked_step_compiles():
    torch._dynamo.reset()

    def run(compiled):
        gen = torch.Generator().manual_seed(3)
        p = torch.randn(3, 6, 4, generator=gen)
        opt = tox.Kron(
            [p],
            lr=0.01,
            seed=3,
            stacked=True,
            use_magma=True,
            preconditioner_update_probability=tox.precond_update_prob_schedule(flat_start=1, decay=0.5),
        )
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for _ in range(4):
            p.grad = torch.randn(3, 6, 4, generator=gen)
            step()
        return p, opt

    eager, e_opt = run(False)
    compiled, c_opt = run(True)
    assert torch.equal(eager, compiled)
    for key in ("Q", "L", "mu", "magma_score", "step"):
        assert torch.equal(e_opt.state[eager][key], c_opt.state[compiled][key]), key


def test_stacked_op_passes_opcheck():
    # The stacked op call (whole (L, ...) tensors, batched in chunks), with
    # state past its first step.
    gen = torch.Generator().manual_seed(8)
    params = [torch.randn(3, 5, 4, generator=gen), torch.randn(2, 6, generator=gen)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = tox.Kron(params, lr=0.01, seed=2, use_magma=True, stacked=True, stacked_chunk_size=2)
    opt.step()
    group = opt.param_groups[0]
    state = [opt.state[p] for p in params]
    args = (
        params,
        [p.grad for p in params],
        [s["mu"] for s in state],
        [s["Q"] for s in state],
        [s["L"] for s in state],
        [s["magma_score"] for s in state],
        [s["step"] for s in state],
        torch.tensor(0.01, dtype=torch.float64),
    )
    kwargs = dict(opt._op_kwargs(group), seed=2, stacked=True, stacked_chunk_size=2)
    torch.library.opcheck(
        torch.ops.torchopt_ext.kron_step_.default,
        args,
        kwargs,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


# Axes of >= 128 take psgd.cpp's blocked products (symmetric Grams, P = Q^T Q
# formed once, the Procrustes step's R R, triangular blocks for EQ) that the
# small shapes above never reach: first, last and middle axes, uneven last
# blocks (530 = 7 x 67 + 61, 770 = 7 x 97 + 91), dense next to diagonal
# factors.
@pytest.mark.parametrize("mode", ["EQ", "Q0.5EQ1.5", "QUAD"])
def test_blocked_products_match_reference(mode):
    shapes = [(530, 40), (3, 770), (2, 520, 3)]
    err, *_ = _run(shapes, torch.float64, steps=4, lr=0.01, preconditioner_mode=mode, max_skew_triangular=math.inf)
    assert [int(x) for x in torch.ops.torchopt_ext.kron_factor_layout([3, 770], max_skew_triangular=math.inf)] == [1, 1]
    assert err <= 1e-12, f"{mode}: max error {err}"
