"""Adafactor: parity with torch.optim.Adafactor (single-tensor), a float64
reference from the spec for the Hugging Face extras, memory, mixed precision."""

import copy

import pytest
import torch
from helpers import run_side_by_side
from reference.adafactor import AdafactorReference

import torchopt_ext.optim as tox

SHAPES = [(), (1,), (7,), (1001,), (17, 33), (3, 4, 5), (64, 128)]
# Measured max |diff| after 20 steps (params ~1): fp32 4.8e-7, fp64 6.7e-16.
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def _torch_adafactor(**kwargs):
    return lambda ps: torch.optim.Adafactor(ps, foreach=False, **kwargs)


def _assert_close(ours, ref, dtype):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(weight_decay=0.1),
        dict(maximize=True, weight_decay=0.05),
        dict(eps=(1e-3, 1e-2)),  # explicit eps1, large enough to clamp
        dict(lr=0.3, d=2.0, beta2_decay=-0.5),  # lr above 1/sqrt(t): the relative cap decides
    ],
    ids=["defaults", "weight-decay", "maximize", "eps1", "lr-d-decay"],
)
def test_matches_torch_adafactor(config, dtype):
    ours, ref = run_side_by_side(
        lambda ps: tox.Adafactor(ps, **config), _torch_adafactor(**config), SHAPES, dtype, steps=20
    )
    _assert_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_adafactor_with_non_contiguous_grads(dtype):
    ours, ref = run_side_by_side(
        lambda ps: tox.Adafactor(ps, weight_decay=0.01),
        _torch_adafactor(weight_decay=0.01),
        SHAPES,
        dtype,
        non_contiguous=True,
    )
    _assert_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_adafactor_with_tensor_lr_and_groups(dtype):
    # torch keeps a tensor lr as a tensor, so alpha is computed in the lr's
    # dtype: a float64 lr keeps fp64 parity exact (a float32 lr under fp64
    # params differs from torch at ~1e-8 relative).
    def groups(ps):
        return [
            {"params": ps[:3], "lr": torch.tensor(0.05, dtype=dtype), "weight_decay": 0.2},
            {"params": ps[3:5], "weight_decay": 0.1},
            {"params": ps[5:], "lr": torch.tensor(3e-3, dtype=dtype), "d": 1.5},
        ]

    ours, ref = run_side_by_side(
        lambda ps: tox.Adafactor(groups(ps)),
        lambda ps: torch.optim.Adafactor(groups(ps), foreach=False),
        SHAPES,
        dtype,
    )
    _assert_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "config",
    [
        dict(beta1=0.9, weight_decay=0.1),
        dict(relative_step=False, lr=1e-3),
        dict(scale_parameter=False, lr=0.05),
        dict(warmup_init=True),
        dict(relative_step=False, scale_parameter=False, lr=2e-3, beta1=0.5, maximize=True, eps=(1e-30, 1e-3)),
    ],
    ids=["beta1", "no-relative-step", "no-scale-parameter", "warmup-init", "hf-explicit-lr"],
)
def test_extras_match_float64_reference(config, dtype):
    ours, ref = run_side_by_side(
        lambda ps: tox.Adafactor(ps, **config), lambda ps: AdafactorReference(ps, **config), SHAPES, dtype
    )
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_with_all_zero_rows_and_columns(dtype):
    # Zero rows/columns make row_var/col_var zero: the eps1^2 clamp decides
    # there (the kernel's per-row/column split must give torch's 1/eps1 cap).
    ours = [torch.randn(12, 20, dtype=dtype), torch.randn(2, 6, 9, dtype=dtype)]
    ref = [p.clone() for p in ours]
    opt = tox.Adafactor(ours, eps=(1e-4, 1e-3))
    ref_opt = torch.optim.Adafactor(ref, eps=(1e-4, 1e-3), foreach=False)
    for step in range(20):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, dtype=dtype)
            g[..., 3, :] = 0  # a row that never gets a gradient
            g[..., :, 5] = 0  # and a column
            if step % 3 == 0:
                g = g * 1e-6  # tiny grads: the clamp is active elsewhere too
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    _assert_close(ours, ref, dtype)


def test_reference_agrees_with_torch_on_the_defaults():
    # The reference is the oracle for the extras: check it against torch on the shared part.
    ours, ref = run_side_by_side(
        lambda ps: AdafactorReference(ps, weight_decay=0.1),
        _torch_adafactor(weight_decay=0.1),
        SHAPES,
        torch.float64,
    )
    _assert_close(ours, ref, torch.float64)


def test_extras_change_the_trajectory():
    # Guards against options that are accepted but ignored.
    base, _ = run_side_by_side(lambda ps: tox.Adafactor(ps), lambda ps: tox.Adafactor(ps), [(8, 6)], torch.float64)
    for config in (dict(beta1=0.9), dict(relative_step=False), dict(scale_parameter=False), dict(warmup_init=True)):
        other, _ = run_side_by_side(
            lambda ps, config=config: tox.Adafactor(ps, **config), lambda ps: tox.Adafactor(ps), [(8, 6)], torch.float64
        )
        assert not torch.allclose(base[0], other[0]), config


def test_factored_state_is_rows_plus_cols():
    p = torch.randn(256, 512)
    opt = tox.Adafactor([p])
    p.grad = torch.randn(256, 512)
    opt.step()
    state = opt.state[p]
    assert set(state) == {"step", "row_var", "col_var"}
    assert state["row_var"].shape == (256, 1) and state["col_var"].shape == (1, 512)
    assert sum(v.numel() for k, v in state.items() if k != "step") == 256 + 512


def test_state_matches_torch_layout():
    ps = [torch.randn(4, 5, 6), torch.randn(3), torch.randn(())]
    ours = tox.Adafactor([p.clone() for p in ps])
    ref = torch.optim.Adafactor([p.clone() for p in ps], foreach=False)
    for opt in (ours, ref):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
    for a, b in zip(ours.state_dict()["state"].values(), ref.state_dict()["state"].values()):
        assert set(a) == set(b)
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_resume_from_torch_adafactor_state_dict():
    params_ref = [torch.randn(6, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    params_ours = [p.clone() for p in params_ref]
    grads = [[torch.randn_like(p) for p in params_ref] for _ in range(8)]
    ref = torch.optim.Adafactor(params_ref, lr=0.05, weight_decay=0.1, foreach=False)

    def apply(opt, params, gs):
        for step in gs:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()

    apply(ref, params_ref, grads[:4])
    ours = tox.Adafactor(params_ours, lr=0.05, weight_decay=0.1)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    with torch.no_grad():
        for a, b in zip(params_ours, params_ref):
            a.copy_(b)
    apply(ref, params_ref, grads[4:])
    apply(ours, params_ours, grads[4:])
    _assert_close(params_ours, params_ref, torch.float64)
    assert ours.param_groups[0]["beta1"] is None  # options missing from torch's checkpoint: our defaults


def test_load_rejects_state_of_the_wrong_shape():
    p = torch.randn(4, 3)
    opt = tox.Adafactor([p])
    p.grad = torch.randn(4, 3)
    opt.step()
    sd = opt.state_dict()
    other = tox.Adafactor([torch.randn(4, 5)])
    with pytest.raises(ValueError, match="col_var"):
        other.load_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_with_fp32_state_track_fp32_run(dtype):
    shapes = [(33, 40), (257,)]
    ref = [torch.randn(s).to(dtype).float() for s in shapes]
    low = [p.to(dtype) for p in ref]
    config = dict(beta1=0.9, weight_decay=0.01, eps=(1e-30, 1e-3))
    opt_low = tox.Adafactor(low, state_dtype=torch.float32, **config)
    opt_ref = tox.Adafactor(ref, **config)
    for _ in range(20):
        for a, b in zip(low, ref):
            g = torch.randn(a.shape).to(dtype)
            a.grad, b.grad = g, g.float()
        opt_low.step()
        opt_ref.step()
    resolution = 2**-7 if dtype == torch.bfloat16 else 2**-10
    for a, b in zip(low, ref):
        assert all(v.dtype == torch.float32 for k, v in opt_low.state[a].items() if k != "step")
        assert (a.float() - b).abs().max() <= 4 * resolution * b.abs().max()


def test_results_do_not_depend_on_thread_count():
    def run(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(3)
            ps = [torch.randn(700, 300), torch.randn(2, 300, 257), torch.randn(200_000)]
            opt = tox.Adafactor(ps, beta1=0.9)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()
            return ps
        finally:
            torch.set_num_threads(previous)

    for a, b in zip(run(1), run(2)):
        assert torch.equal(a, b)


def test_closure_and_scheduler():
    p = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    ours = tox.Adafactor([p], lr=0.02, relative_step=False)
    ref = AdafactorReference([q], lr=0.02, relative_step=False)
    sched = torch.optim.lr_scheduler.StepLR(ours, step_size=2, gamma=0.5)
    for _ in range(6):
        ref.lr = ours.param_groups[0]["lr"]

        def closure():
            ours.zero_grad()
            loss = (p**2).sum()
            loss.backward()
            return loss

        loss = ours.step(closure)
        q.grad = 2 * q.detach()
        ref.step()
        sched.step()
        assert loss.item() > 0
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4,), (2, 2)])
def test_nan_gradients_propagate_as_in_torch(shape):
    # Documented: applied as-is, like torch.optim (use GradScaler to skip such
    # steps). A vector's NaN stays in its element (max(1, NaN) keeps the clip at
    # 1, as Python's max does in torch); a factored param's NaN spreads through
    # its row/col factors and their mean to the whole matrix.
    g = torch.ones(shape)
    g.view(-1)[0] = float("nan")
    ours, ref = torch.ones(shape), torch.ones(shape)
    ours.grad, ref.grad = g.clone(), g.clone()
    tox.Adafactor([ours]).step()
    torch.optim.Adafactor([ref], foreach=False).step()
    assert torch.isnan(ours).sum() == (1 if len(shape) == 1 else 4)
    torch.testing.assert_close(ours, ref, equal_nan=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr"),
        (dict(beta2_decay=0.5), "beta2_decay"),
        (dict(eps=(-1.0, 1e-3)), "eps1"),
        (dict(eps=(None, -1e-3)), "eps2"),
        (dict(eps=(None,)), "eps"),
        (dict(d=0.5), "d \\(clipping"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(beta1=1.0), "beta1"),
        (dict(warmup_init=True, relative_step=False), "warmup_init"),
        (dict(state_dtype=torch.int32), "state_dtype"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.Adafactor([torch.randn(3)], **kwargs)


def test_op_rejects_misplaced_factored_state():
    p = torch.randn(4, 3)
    args = ([p], [torch.randn(4, 3)], [], [], [torch.zeros(4, 3)], [], [torch.zeros(())], torch.tensor(0.01))
    kwargs = dict(
        beta2_decay=-0.8,
        eps1=None,
        eps2=1e-3,
        d=1.0,
        weight_decay=0.0,
        beta1=None,
        relative_step=True,
        scale_parameter=True,
        warmup_init=False,
        maximize=False,
    )
    with pytest.raises(ValueError, match="row_vars"):
        torch.ops.torchopt_ext.adafactor_step_(*args, **kwargs)
    assert args[6][0].item() == 0  # nothing was touched


def test_sparse_gradients_are_rejected():
    p = torch.zeros(5)
    opt = tox.Adafactor([p])
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.tensor([1.0, 2.0]), (5,))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_grad_scale_unscales_factored_grads_in_kernel():
    shapes = [(9, 70), (2, 3, 40), (33,)]
    scaled = [torch.randn(s, dtype=torch.float64) for s in shapes]
    plain = [p.clone() for p in scaled]
    opt_scaled = tox.Adafactor(scaled, beta1=0.9)
    opt_plain = tox.Adafactor(plain, beta1=0.9)
    for _ in range(4):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for p, q, g in zip(scaled, plain, grads):
            p.grad, q.grad = g * 512.0, g.clone()
        opt_scaled.grad_scale = torch.tensor(512.0)
        opt_scaled.found_inf = torch.tensor(0.0)
        opt_scaled.step()
        opt_plain.step()
        for p, g in zip(scaled, grads):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    for p, q in zip(scaled, plain):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_bf16_state_runs_close_to_fp32():
    # Default state dtype follows the param: bf16 factors, fp32 math.
    ref = [torch.randn(40, 24).to(torch.bfloat16).float(), torch.randn(50).to(torch.bfloat16).float()]
    low = [p.to(torch.bfloat16) for p in ref]
    opt_low = tox.Adafactor(low, eps=(1e-30, 1e-3))
    opt_ref = tox.Adafactor(ref, eps=(1e-30, 1e-3))
    for _ in range(10):
        for a, b in zip(low, ref):
            g = torch.randn(a.shape).to(torch.bfloat16)
            a.grad, b.grad = g, g.float()
        opt_low.step()
        opt_ref.step()
    assert opt_low.state[low[0]]["row_var"].dtype == torch.bfloat16
    for a, b in zip(low, ref):
        assert (a.float() - b).abs().max() <= 8 * 2**-7 * b.abs().max()


def _sr_run(seed, stochastic=True):
    torch.manual_seed(0)
    p = torch.randn(64, 96).to(torch.bfloat16)
    opt = tox.Adafactor([p], state_dtype=torch.float32, stochastic_rounding=stochastic, seed=seed)
    for _ in range(5):
        p.grad = torch.randn(64, 96).to(torch.bfloat16)
        opt.step()
    return p


def test_stochastic_rounding_is_deterministic_given_seed():
    assert torch.equal(_sr_run(7), _sr_run(7))
    assert not torch.equal(_sr_run(7), _sr_run(8))
    assert not torch.equal(_sr_run(7), _sr_run(7, stochastic=False))


def test_opcheck_mixed_precision_without_beta1():
    shapes = [(6, 5), (2, 3, 4), (7,), ()]
    params = [torch.randn(s, dtype=torch.bfloat16) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = tox.Adafactor(params, state_dtype=torch.float32, weight_decay=0.1, stochastic_rounding=True, seed=1)
    opt.step()
    group = opt.param_groups[0]
    ps, gs, steps, rows, cols, vars_, avgs = [], [], [], [], [], [], []
    opt._init_group(group, ps, gs, steps, rows, cols, vars_, avgs)
    assert len(rows) == 2 and len(vars_) == 2 and avgs == []
    args = (ps, gs, rows, cols, vars_, avgs, steps, torch.tensor(group["lr"], dtype=torch.float64))
    kwargs = dict(opt._op_kwargs(group), stochastic_rounding=True, seed=1)
    torch.library.opcheck(
        torch.ops.torchopt_ext.adafactor_step_.default,
        args,
        kwargs,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_large_fp32_matrices_track_the_float64_reference():
    # Wide and tall matrices split into several row blocks (column sums
    # flushed to double every 64 rows): fp32 stays within a few ulps of fp64.
    shapes = [(20, 70000), (70000, 20), (3, 200, 300)]
    ours = [torch.randn(s) for s in shapes]
    ref = [p.double() for p in ours]
    opt = tox.Adafactor(ours, weight_decay=0.01)
    ref_opt = AdafactorReference(ref, weight_decay=0.01)
    for _ in range(3):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape)
            p.grad, q.grad = g, g.double()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.double(), q, rtol=2e-6, atol=2e-6)
