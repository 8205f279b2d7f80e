"""SophiaH / SophiaG: update parity with the official SophiaG and the float64
reference, the Hessian estimators, the refresh API and checkpoints."""

import io

import pytest
import torch
from helpers import SHAPES, make_params, tolerances
from reference import sophia as ref

import torchopt_ext.hessian as hz
import torchopt_ext.optim as tox

# -- update math -------------------------------------------------------------------


def _square_roots(params, scale):
    return [torch.randn_like(p) * scale for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sophia_g_matches_official_with_injected_hessians(dtype, maximize, weight_decay):
    sophia_opt = pytest.importorskip("sophia_opt", reason="sophia-opt==0.2.2 is a test dependency (see .ci/test.sh)")
    # Official SophiaG with bs=1 is our step with gamma = rho and eps_mode "add".
    # Its update_hessian() blends p.grad**2, so each refresh feeds it s and us s*s.
    period, steps = 3, 24
    kw = dict(lr=0.05, betas=(0.9, 0.8), rho=2.0, weight_decay=weight_decay, maximize=maximize)
    ours = make_params(SHAPES, dtype)
    theirs = [p.clone() for p in ours]
    opt = tox.SophiaG(ours, **kw, seed=0)
    official = sophia_opt.SophiaG(theirs, **kw)
    clipped = unclipped = 0
    for t in range(steps):
        if t % period == 0:
            roots = _square_roots(ours, 1.0)
            for q, s in zip(theirs, roots):
                q.grad = s.clone()
            official.update_hessian()
            opt.update_hessian(hessian=[s * s for s in roots])
        for p, q in zip(ours, theirs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        official.step(bs=1)
        for p in ours:
            st = opt.state[p]
            ratio = (st["exp_avg"] / (2.0 * st["hessian"] + 1e-15)).abs()
            clipped += int((ratio > 1).sum())
            unclipped += int((ratio < 1).sum())
    # Both branches of the clip were exercised.
    assert clipped > 100 and unclipped > 100
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(opt.state[p]["hessian"], official.state[q]["hessian"], **tolerances(dtype))
        torch.testing.assert_close(opt.state[p]["exp_avg"], official.state[q]["exp_avg"], **tolerances(dtype))
        torch.testing.assert_close(p, q, **tolerances(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps_mode", ["max", "add"])
@pytest.mark.parametrize("maximize", [False, True])
def test_sophia_h_matches_float64_reference(dtype, eps_mode, maximize):
    period, steps = 4, 21
    hp = dict(lr=0.02, beta1=0.95, gamma=0.5, eps=1e-3, weight_decay=0.05, eps_mode=eps_mode, maximize=maximize)
    ours = make_params(SHAPES, dtype)
    mine = [p.double() for p in ours]
    m = [torch.zeros_like(p) for p in mine]
    h = [torch.zeros_like(p) for p in mine]
    opt = tox.SophiaH(
        ours,
        lr=hp["lr"],
        betas=(hp["beta1"], 0.7),
        gamma=hp["gamma"],
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        eps_mode=eps_mode,
        maximize=maximize,
        update_period=period,
        seed=0,
    )
    for t in range(steps):
        if t % period == 0:
            est = [torch.rand_like(p) * 2 for p in ours]
            opt.update_hessian(hessian=est)
            ref.update_hessian(h, [e.double() for e in est], beta2=0.7)
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(ours, grads):
            p.grad = g
        opt.step()
        ref.sophia_step(mine, [g.double() for g in grads], m, h, **hp)
    for p, q in zip(ours, mine):
        torch.testing.assert_close(p, q.to(dtype), **tolerances(dtype))


def test_no_estimate_degenerates_to_sign_momentum_step():
    # Documented: with h = 0 the step is lr * sign(m) wherever |m| > eps.
    p = torch.randn(50, dtype=torch.float64)
    start = p.clone()
    g = torch.randn(50, dtype=torch.float64)
    opt = tox.SophiaH([p], lr=0.01, weight_decay=0.0)
    p.grad = g
    opt.step()
    torch.testing.assert_close(p, start - 0.01 * torch.sign(g), rtol=0, atol=1e-15)


def test_bf16_params_use_fp32_math_and_round_once():
    # Same inputs as an fp32 run re-synced to the bf16 params before each step:
    # the bf16 result must be the fp32 result rounded once.
    torch.manual_seed(2)
    p16 = torch.randn(300).to(torch.bfloat16)
    p32 = p16.float()
    a = tox.SophiaH([p32], lr=0.01, gamma=0.5, seed=0)
    b = tox.SophiaH([p16], lr=0.01, gamma=0.5, seed=0, state_dtype=torch.float32)
    for t in range(10):
        if t % 5 == 0:
            e = torch.rand(300)
            a.update_hessian(hessian=[e])
            b.update_hessian(hessian=[e])
        g = torch.randn(300).to(torch.bfloat16)
        with torch.no_grad():
            p32.copy_(p16.float())
        p32.grad, p16.grad = g.float(), g
        a.step()
        b.step()
        assert torch.equal(p16, p32.to(torch.bfloat16))
    assert b.state[p16]["hessian"].dtype == torch.float32
    assert torch.equal(b.state[p16]["exp_avg"], a.state[p32]["exp_avg"])


def test_nan_gradient_propagates_like_torch_optim():
    # Documented behaviour (docs/design.md): non-finite grads are applied as-is.
    p = torch.ones(4)
    opt = tox.SophiaG([p], lr=0.1)
    opt.update_hessian(hessian=[torch.ones(4)])
    p.grad = torch.tensor([float("nan"), 1.0, float("inf"), -1.0])
    opt.step()
    assert torch.isnan(p[0]) and torch.isfinite(p[1]) and torch.isfinite(p[3])
    assert torch.isnan(opt.state[p]["exp_avg"][0]) and torch.isinf(opt.state[p]["exp_avg"][2])


# -- estimators ----------------------------------------------------------------------


def _quadratic(n=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return b @ b.T + torch.eye(n, dtype=torch.float64)


def test_hutchinson_is_z_times_hz_on_a_quadratic():
    a = _quadratic()
    x1 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * torch.cat([x1, x2]) @ a @ torch.cat([x1, x2])
    est = hz.hutchinson(loss, [x1, x2], generator=torch.Generator().manual_seed(5))
    z = torch.cat(hz.sample_probes([x1, x2], generator=torch.Generator().manual_seed(5)))
    expected = z * (a @ z)  # includes the cross terms between x1 and x2
    torch.testing.assert_close(torch.cat(est), expected, rtol=1e-13, atol=1e-13)
    assert not torch.allclose(expected, torch.diag(a))  # one probe is not the diagonal


@pytest.mark.parametrize("distribution, tol", [("rademacher", 0.25), ("gaussian", 0.6)])
def test_hutchinson_is_unbiased(distribution, tol):
    a = _quadratic(6, seed=1)
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * x @ a @ x
    gen = torch.Generator().manual_seed(0)
    (est,) = hz.hutchinson(loss, [x], generator=gen, n_samples=4000, distribution=distribution)
    torch.testing.assert_close(est, torch.diag(a), rtol=0, atol=tol)
    # The off-diagonal noise is far larger than the tolerance for one probe.
    (one,) = hz.hutchinson(0.5 * x @ a @ x, [x], generator=gen)
    assert (one - torch.diag(a)).abs().max() > 1.0


def test_rademacher_probes_are_plus_minus_one():
    (z,) = hz.sample_probes([torch.empty(10000)], generator=torch.Generator().manual_seed(0))
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.05


def test_hutchinson_gives_zeros_for_unused_and_linear_params():
    x = torch.randn(3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    loss = (x**2).sum() + (w * 3.0).sum()
    ex, ew, eu = hz.hutchinson(loss, [x, w, unused])
    torch.testing.assert_close(ex, torch.full((3,), 2.0), rtol=0, atol=0)
    assert torch.equal(ew, torch.zeros(3)) and torch.equal(eu, torch.zeros(2))


def test_gauss_newton_bartlett_matches_direct_computation():
    torch.manual_seed(3)
    x = torch.randn(4, 5, 6, dtype=torch.float64)  # (batch, positions, features)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    logits = x @ w.T + b
    est_w, est_b = hz.gauss_newton_bartlett(logits, [w, b], generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        flat = logits.reshape(-1, 3)
        probs = torch.softmax(flat.float(), -1)
        y = torch.multinomial(probs, 1, replacement=True, generator=torch.Generator().manual_seed(9)).squeeze(-1)
        n = flat.shape[0]
        dlogits = (torch.softmax(flat, -1) - torch.nn.functional.one_hot(y, 3)) / n
        gw = dlogits.T @ x.reshape(-1, 6)
        gb = dlogits.sum(0)
    assert n == 20
    torch.testing.assert_close(est_w, n * gw * gw, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(est_b, n * gb * gb, rtol=1e-12, atol=1e-15)


def test_estimators_are_reproducible_given_a_seed():
    w = torch.randn(5, 3, requires_grad=True)
    x = torch.randn(8, 3)

    def run(seed, fn):
        gen = torch.Generator().manual_seed(seed)
        if fn == "h":
            return hz.hutchinson(((x @ w.T) ** 2).sum(), [w], generator=gen)[0]
        return hz.gauss_newton_bartlett(x @ w.T, [w], generator=gen)[0]

    for fn in ("h", "g"):
        assert torch.equal(run(1, fn), run(1, fn))
        assert not torch.equal(run(1, fn), run(2, fn))


def test_estimators_reject_bad_input():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="n_samples"):
        hz.hutchinson((x**2).sum(), [x], n_samples=0)
    with pytest.raises(ValueError, match="distribution"):
        hz.hutchinson((x**2).sum(), [x], distribution="uniform")
    with pytest.raises(ValueError, match="loss"):
        hz.hutchinson((x**2).detach().sum(), [x])
    with pytest.raises(ValueError, match="params\\[0\\]"):
        hz.gauss_newton_bartlett(x.reshape(1, 3) * 2, [torch.randn(3)])


# -- refresh API -----------------------------------------------------------------------


def test_update_hessian_evaluates_the_closure_every_period():
    x = torch.randn(4, requires_grad=True)
    opt = tox.SophiaH([x], update_period=3, seed=0)
    evaluated = []
    history = []
    for call in range(8):

        def closure(call=call):
            evaluated.append(call)
            return (x**4).sum()

        result = opt.update_hessian(closure)
        assert (result is None) == (call % 3 != 0)
        history.append(opt.state[x]["hessian"].clone())
    assert evaluated == [0, 3, 6]
    changed = [i for i in range(1, 8) if not torch.equal(history[i], history[i - 1])]
    assert changed == [3, 6]
    assert opt.state[x]["step"].item() == 0  # refreshing does not step


def test_sophia_h_refresh_equals_ema_of_hutchinson():
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    opt = tox.SophiaH([x], betas=(0.9, 0.75), update_period=1, n_samples=2, seed=11)
    gen = torch.Generator().manual_seed(11)
    h = torch.zeros(6, dtype=torch.float64)
    for _ in range(3):
        opt.update_hessian(lambda: (x**3).sum() + (x[:3] * x[3:]).sum())
        (e,) = hz.hutchinson((x**3).sum() + (x[:3] * x[3:]).sum(), [x], generator=gen, n_samples=2)
        h = 0.75 * h + 0.25 * e
    torch.testing.assert_close(opt.state[x]["hessian"], h, rtol=1e-14, atol=1e-14)


def test_sophia_g_refresh_equals_scaled_gnb():
    torch.manual_seed(4)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    opt = tox.SophiaG([w], update_period=2, seed=5)
    assert opt.update_hessian(lambda: x @ w.T).shape == (2, 7, 5)
    (e,) = hz.gauss_newton_bartlett(x @ w.T, [w], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(opt.state[w]["hessian"], 0.01 * e, rtol=1e-14, atol=0)
    assert opt.update_hessian(lambda: pytest.fail("evaluated off-period")) is None


def test_explicit_estimates_as_list_and_dict():
    a, b = torch.randn(3), torch.randn(2)
    opt = tox.SophiaG([{"params": [a]}, {"params": [b], "betas": (0.9, 0.5)}])
    opt.update_hessian(hessian=[torch.ones(3), None])
    assert torch.equal(opt.state[a]["hessian"], torch.full((3,), 0.01 * 1.0))
    assert "hessian" not in opt.state[b]
    opt.update_hessian(hessian={b: torch.full((2,), 4.0)})
    assert torch.equal(opt.state[b]["hessian"], torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="entries"):
        opt.update_hessian(hessian=[torch.ones(3)])
    with pytest.raises(ValueError, match="exactly one"):
        opt.update_hessian()
    with pytest.raises(ValueError, match="estimates\\[0\\]"):
        opt.update_hessian(hessian=[torch.ones(4), None])


def test_schedule_and_generator_survive_state_dict():
    def make():
        torch.manual_seed(0)
        w = torch.randn(4, 3, requires_grad=True)
        return w, tox.SophiaH([w], update_period=3, seed=7)

    def iterate(w, opt, n):
        for _ in range(n):
            opt.update_hessian(lambda: (w**4).sum())
            w.grad = torch.ones_like(w)
            opt.step()

    w, opt = make()
    iterate(w, opt, 4)  # refreshed on calls 0 and 3
    buffer = io.BytesIO()
    torch.save({"w": w.detach().clone(), "opt": opt.state_dict()}, buffer)
    iterate(w, opt, 5)  # refreshes on calls 6
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    w2, opt2 = make()
    with torch.no_grad():
        w2.copy_(saved["w"])
    opt2.load_state_dict(saved["opt"])
    opt2.generator.manual_seed(123)  # overwritten below by a second load
    opt2.load_state_dict(saved["opt"])
    iterate(w2, opt2, 5)
    assert torch.equal(w, w2)
    assert torch.equal(opt.state[w]["hessian"], opt2.state[w2]["hessian"])


def test_compiled_step_with_a_hessian_matches_eager():
    def run(compiled):
        torch.manual_seed(1)
        params = [torch.randn(8, 5), torch.randn(())]
        opt = tox.SophiaG(params, lr=0.01, rho=1.0, seed=0)
        opt.update_hessian(hessian=[torch.rand_like(p) for p in params])
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for t in range(4):
            if t == 2:  # a refresh between compiled steps is seen by the next one
                opt.update_hessian(hessian=[torch.rand_like(p) * 4 for p in params])
            for p in params:
                p.grad = torch.randn_like(p)
            step()
        return params

    torch._dynamo.reset()
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_opcheck_update_hessian_op():
    from test_ops import OPCHECK_UTILS

    hessians = [torch.rand(4, 3), torch.rand(()), torch.rand(5, dtype=torch.bfloat16)]
    estimates = [torch.rand(4, 3), torch.rand(()), torch.rand(5, dtype=torch.bfloat16)]
    torch.library.opcheck(
        torch.ops.torchopt_ext.sophia_update_hessian_.default,
        (hessians, estimates),
        dict(beta2=0.9),
        test_utils=OPCHECK_UTILS,
    )


def test_step_op_does_not_write_the_hessian():
    p, g = torch.randn(40), torch.randn(40)
    h = torch.rand(80)[::2]  # strided: a copy-back would show up as a version bump
    version = h._version
    before = h.clone()
    torch.ops.torchopt_ext.sophia_step_(
        [p], [g], [torch.zeros(40)], [h], [torch.zeros(())], torch.tensor(0.1),
        beta1=0.9, gamma=0.1, eps=1e-12, weight_decay=0.0, eps_mode="max", maximize=False,
    )  # fmt: skip
    assert torch.equal(h, before) and h._version == version


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("SophiaH", dict(lr=-1.0), "lr"),
        ("SophiaH", dict(betas=(1.0, 0.99)), "betas\\[0\\]"),
        ("SophiaH", dict(betas=(0.9, 1.0)), "betas\\[1\\]"),
        ("SophiaH", dict(gamma=-0.1), "gamma"),
        ("SophiaH", dict(eps=0.0), "eps"),
        ("SophiaH", dict(eps_mode="min"), "eps_mode"),
        ("SophiaH", dict(weight_decay=-1.0), "weight_decay"),
        ("SophiaH", dict(update_period=0), "update_period"),
        ("SophiaH", dict(n_samples=0), "n_samples"),
        ("SophiaH", dict(distribution="uniform"), "distribution"),
        ("SophiaH", dict(state_dtype=torch.int32), "state_dtype"),
        ("SophiaG", dict(rho=-0.04), "rho"),
        ("SophiaG", dict(eps=-1.0), "eps"),
        ("SophiaG", dict(update_period=2.5), "update_period"),
        ("SophiaG", dict(lr=torch.tensor([0.1, 0.2])), "lr"),
    ],
)
def test_rejects_bad_hyperparameters(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(tox, name)([torch.randn(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(gamma=-1.0), "gamma"), (dict(eps=0.0), "eps"), (dict(eps_mode="x"), "eps_mode"), (dict(beta1=1.0), "beta1")],
)
def test_step_op_names_bad_arguments(kwargs, message):
    args = dict(beta1=0.9, gamma=0.1, eps=1e-12, weight_decay=0.0, eps_mode="max", maximize=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        torch.ops.torchopt_ext.sophia_step_(
            [torch.randn(3)], [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(())],
            torch.tensor(0.1), **args,
        )  # fmt: skip


# -- convergence ---------------------------------------------------------------------


def test_sophia_h_beats_unrefreshed_hessian_on_ill_conditioned_quadratic():
    d = torch.logspace(-1, 2, 20, dtype=torch.float64)  # condition number 1000
    x0 = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(refresh):
        x = x0.clone().requires_grad_(True)
        # gamma * h ~ diag(H): u ~ x / gamma-scaled Newton step, whatever the conditioning.
        opt = tox.SophiaH([x], lr=0.05, betas=(0.9, 0.9), gamma=1.0, weight_decay=0.0, update_period=5, seed=0)
        for _ in range(300):
            if refresh:
                opt.update_hessian(lambda: 0.5 * (d * x * x).sum())
            loss = 0.5 * (d * x * x).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (0.5 * (d * x * x).sum()).item()

    with_h, without_h = run(True), run(False)
    # Without an estimate it is a sign-momentum step that keeps oscillating.
    assert with_h < 1e-4 * without_h, (with_h, without_h)
