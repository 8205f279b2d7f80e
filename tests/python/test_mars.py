"""MARS against a float64 reference written from the spec (no clean oracle is on PyPI)."""

import pytest
import torch
from helpers import eager_then_compiled, run_side_by_side
from reference.mars import MarsReference

import torchopt_ext.optim as tox

# 2-D tensors take the MARS branch, the rest MARS's AdamW branch; one large
# matrix so the unit-norm clip of c triggers, one small so it does not.
SHAPES = [(40, 30), (3, 5), (7,), (), (2, 3, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(lr=1e-2, weight_decay=0.1, gamma=0.05),
        dict(lr=1e-2, amsgrad=True, weight_decay_1d=0.0, betas_1d=(0.8, 0.9)),
        dict(lr=1e-3, mars_type="mars-lion", weight_decay=0.1),
        dict(lr=1e-2, optimize_1d=True),
    ],
    ids=["defaults", "wd-gamma", "amsgrad", "lion", "optimize_1d"],
)
def test_mars_matches_float64_reference(config, dtype):
    ours, ref = run_side_by_side(
        lambda ps: tox.MARS(ps, **config),
        lambda ps: MarsReference(ps, **config),
        SHAPES,
        dtype,
    )
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_first_step_amplifies_the_gradient_before_clipping():
    # g_prev = 0 on step 1: c = (1 + gamma*b1/(1-b1)) g; with a small g (no
    # clip) and beta1 = 0 the first moment is exactly c.
    p = torch.zeros(3, 2, dtype=torch.float64)
    opt = tox.MARS([p], betas=(0.5, 0.99), gamma=0.1)
    g = torch.full((3, 2), 0.01, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    expected_c = (1 + 0.1 * 0.5 / 0.5) * g
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.5 * expected_c, rtol=1e-14, atol=0)
    torch.testing.assert_close(opt.state[p]["last_grad"], g, rtol=0, atol=0)


def test_large_corrected_gradient_is_clipped_to_unit_norm():
    p = torch.zeros(4, 4, dtype=torch.float64)
    opt = tox.MARS([p], betas=(0.0, 0.99))
    p.grad = torch.full((4, 4), 10.0, dtype=torch.float64)
    opt.step()
    # With beta1 = 0 the first moment is the clipped c itself.
    assert opt.state[p]["exp_avg"].norm().item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mars_type="adamw"), "mars_type"),
        (dict(mars_type="mars-shampoo", ns_dtype=torch.int32), "ns_dtype"),
        (dict(gamma=-0.1), "gamma"),
        (dict(betas_1d=(0.9, 1.5)), "betas\\[1\\]"),
        (dict(mars_type="mars-lion", amsgrad=True), "amsgrad"),
    ],
)
def test_mars_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.MARS([torch.randn(3, 3)], **kwargs)


# mars-shampoo: 2-D params (tall, wide, wider) take the Newton-Schulz rule,
# the rest MARS's AdamW branch, or with optimize_1d the mars-adamw rule.
SHAMPOO_SHAPES = [(40, 30), (30, 40), (12, 50), (7,), (2, 3, 4)]


@pytest.mark.parametrize(
    "config",
    [
        dict(lr=1e-2, mars_type="mars-shampoo", weight_decay=0.1),
        dict(lr=1e-2, mars_type="mars-shampoo", optimize_1d=True, amsgrad=True, gamma=0.05),
    ],
    ids=["shampoo", "shampoo-optimize_1d-amsgrad"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mars_shampoo_matches_float64_reference(config, dtype):
    # ns_dtype=None iterates in the state's dtype (fp32 / fp64), so the
    # float64 polynomial is the exact reference.
    ours, ref = run_side_by_side(
        lambda ps: tox.MARS(ps, ns_dtype=None, **config),
        lambda ps: MarsReference(ps, **config),
        SHAMPOO_SHAPES,
        dtype,
    )
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_mars_shampoo_bf16_newton_schulz_is_close_to_the_exact_polynomial():
    # The default (official) bf16 iteration: within bf16 rounding of the
    # float64 polynomial. Each step moves a param by ~lr * sqrt(max(1, r/c)) / sqrt(min(r, c))
    # per entry (~2e-3 here), so 20 steps of a wrong rule would miss by ~1e-2.
    ours, ref = run_side_by_side(
        lambda ps: tox.MARS(ps, lr=1e-2, mars_type="mars-shampoo"),
        lambda ps: MarsReference(ps, lr=1e-2, mars_type="mars-shampoo"),
        SHAMPOO_SHAPES[:3],
        torch.float32,
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


def _exact_protocol(opt, params, grad_at, steps):
    """The official exact-mode loop: grads of the next batch at the current
    params, update_previous_grad(); grads of this batch, step(), update_last_grad()."""
    for t in range(steps):
        for p, g in zip(params, grad_at(t + 1, params)):
            p.grad = g
        opt.update_previous_grad()
        for p, g in zip(params, grad_at(t, params)):
            p.grad = g
        opt.step()
        opt.update_last_grad()


@pytest.mark.parametrize("mars_type", ["mars-adamw", "mars-lion", "mars-shampoo"])
def test_exact_mars_uses_the_previous_params_gradient_on_the_current_batch(mars_type):
    torch.manual_seed(0)
    shapes = [(6, 5), (4, 9), (5,)]
    # Batch t's loss 0.5 ||A_t x - b_t||^2 per param: grad A_t^T (A_t x - b_t).
    batches = [[(torch.randn(s[0], s[0], dtype=torch.float64), torch.randn(s, dtype=torch.float64)) for s in shapes]]
    for _ in range(25):
        batches.append(
            [(torch.randn(s[0], s[0], dtype=torch.float64), torch.randn(s, dtype=torch.float64)) for s in shapes]
        )

    def grad_at(t, xs):
        return [a.T @ (a @ x.detach() - b) for (a, b), x in zip(batches[t], xs)]

    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ours = [x.clone() for x in init]
    opt = tox.MARS(ours, lr=1e-2, is_approx=False, mars_type=mars_type, gamma=0.1, ns_dtype=None)
    _exact_protocol(opt, ours, grad_at, steps=20)

    ref = [x.clone() for x in init]
    ref_opt = MarsReference(ref, lr=1e-2, mars_type=mars_type, gamma=0.1, exact=True)
    previous = [x.clone() for x in ref]
    for t in range(20):
        for p, g in zip(ref, grad_at(t, ref)):
            p.grad = g
        ref_opt.step()
        # g_prev of step t + 1: batch t + 1 at the params before this step.
        for s, g in zip(ref_opt.state, grad_at(t + 1, previous)):
            s["g_prev"] = g
        previous = [x.clone() for x in ref]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # The approximate mode on the same grads follows another trajectory.
    approx = [x.clone() for x in init]
    _exact_protocol(tox.MARS(approx, lr=1e-2, mars_type=mars_type, gamma=0.1, ns_dtype=None), approx, grad_at, 20)
    assert max((a - b).abs().max().item() for a, b in zip(approx, ref)) > 1e-6


def test_exact_mars_state_round_trips():
    p = torch.randn(4, 3)
    opt = tox.MARS([p], is_approx=False)
    p.grad = torch.randn(4, 3)
    opt.update_previous_grad()
    opt.step()
    opt.update_last_grad()
    torch.testing.assert_close(opt.state[p]["last_grad"], opt.state[p]["previous_grad"], rtol=0, atol=0)
    q = p.detach().clone()
    other = tox.MARS([q], is_approx=False)
    other.load_state_dict(opt.state_dict())
    for key in ("exp_avg", "last_grad", "previous_grad"):
        torch.testing.assert_close(other.state[q][key], opt.state[p][key], rtol=0, atol=0)
    assert other.param_groups[0]["is_approx"] is False


def test_mars_shampoo_tracks_pytorch_optimizer():
    # pytorch-optimizer's MARS(mars_type="shampoo") runs the same rule with its
    # own bf16 Newton-Schulz: the trajectories agree to bf16 rounding (a step
    # moves entries by ~3e-3 here; the two differ by ~1e-4 after 20 steps).
    import pytorch_optimizer  # test dependency (.ci/test.sh)

    torch.manual_seed(0)
    ours = [torch.randn(64, 32), torch.randn(32, 96)]
    theirs = [p.clone() for p in ours]
    a = tox.MARS(ours, lr=1e-2, mars_type="mars-shampoo", weight_decay=0.1)
    b = pytorch_optimizer.MARS(theirs, lr=1e-2, mars_type="shampoo", weight_decay=0.1)
    start = [p.clone() for p in ours]
    for _ in range(20):
        for p, q in zip(ours, theirs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q, s in zip(ours, theirs, start):
        assert (p - s).abs().max() > 1e-2  # it moved
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3)


def test_mars_shampoo_compiled_step_matches_eager():
    eager, compiled, _ = eager_then_compiled(
        lambda ps: tox.MARS(ps, lr=1e-2, mars_type="mars-shampoo", weight_decay=0.1, optimize_1d=True),
        lambda: [torch.randn(12, 8), torch.randn(6, 20), torch.randn(5)],
        seed=2,
    )
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.parametrize("is_approx", [True, False])
def test_mars_shampoo_op_passes_opcheck(is_approx):
    from test_ops import OPCHECK_UTILS

    params = [torch.randn(12, 8), torch.randn(6, 20)]
    args = (
        params,
        [torch.randn_like(p) for p in params],
        [torch.randn_like(p) for p in params],
        [],
        [],
        [torch.randn_like(p) for p in params],
        [torch.tensor(3.0) for _ in params],
        torch.tensor(0.01, dtype=torch.float64),
    )
    kwargs = dict(
        beta1=0.95,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.1,
        gamma=0.025,
        mars_type="mars-shampoo",
        amsgrad=False,
        maximize=False,
        is_approx=is_approx,
        ns_dtype=torch.float32,
    )
    torch.library.opcheck(torch.ops.torchopt_ext.mars_step_.default, args, kwargs, test_utils=OPCHECK_UTILS)
