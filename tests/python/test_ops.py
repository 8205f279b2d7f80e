"""torch.library.opcheck on every op, and the op layer called directly."""

import inspect

import pytest
import torch
from helpers import ALL_OPTIMIZERS

import torchopt_ext.optim as tox

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _adam_args(n, amsgrad, dtype=torch.float32, state_dtype=None):
    state_dtype = state_dtype or dtype
    shapes = [(3, 5), (7,), ()][:n]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, dtype=dtype) for s in shapes]
    m = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    v = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    vmax = [torch.zeros(s, dtype=state_dtype) for s in shapes] if amsgrad else []
    steps = [torch.zeros((), dtype=torch.float32) for _ in shapes]
    args = (params, grads, m, v, vmax, steps, torch.tensor(1e-2, dtype=torch.float64))
    kwargs = dict(
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        decoupled_weight_decay=True,
        amsgrad=amsgrad,
        maximize=False,
    )
    return args, kwargs


def _sgd_args(momentum):
    shapes = [(4, 6), (9,)]
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    buffers = [torch.zeros(s) for s in shapes] if momentum else []
    steps = [torch.zeros((), dtype=torch.float32) for _ in shapes]
    args = (params, grads, buffers, steps, torch.tensor(0.1, dtype=torch.float64))
    kwargs = dict(momentum=momentum, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    return args, kwargs


@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck_adam_step(amsgrad):
    args, kwargs = _adam_args(3, amsgrad)
    torch.library.opcheck(torch.ops.torchopt_ext.adam_step_.default, args, kwargs, test_utils=OPCHECK_UTILS)


def test_opcheck_adam_step_mixed_precision():
    args, kwargs = _adam_args(2, False, dtype=torch.bfloat16, state_dtype=torch.float32)
    kwargs.update(stochastic_rounding=True, seed=3)
    torch.library.opcheck(torch.ops.torchopt_ext.adam_step_.default, args, kwargs, test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_opcheck_sgd_step(momentum):
    args, kwargs = _sgd_args(momentum)
    torch.library.opcheck(torch.ops.torchopt_ext.sgd_step_.default, args, kwargs, test_utils=OPCHECK_UTILS)


def test_op_increments_steps_and_mutates_in_place():
    args, kwargs = _adam_args(2, False)
    params, _, m, _, _, steps, _ = args
    before = [p.clone() for p in params]
    torch.ops.torchopt_ext.adam_step_(*args, **kwargs)
    assert [s.item() for s in steps] == [1.0, 1.0]
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert all(x.abs().sum() > 0 for x in m)


def test_op_rejects_mismatched_lists():
    args, kwargs = _adam_args(2, False)
    args = list(args)
    args[2] = args[2][:1]  # one exp_avg for two params
    with pytest.raises(ValueError, match="exp_avgs"):
        torch.ops.torchopt_ext.adam_step_(*args, **kwargs)


def test_op_rejects_state_on_wrong_dtype():
    args, kwargs = _adam_args(1, False, dtype=torch.float64, state_dtype=torch.float32)
    with pytest.raises(ValueError, match="exp_avgs"):
        torch.ops.torchopt_ext.adam_step_(*args, **kwargs)


def _op_call_of(opt):
    """The op call an optimizer's step makes for its first group."""
    group = opt.param_groups[0]
    params, grads, steps = [], [], []
    # _init_group(group, params, grads, state_steps, *lists): the first lists are
    # the op's state lists (MARS adds lists for its AdamW branch after them).
    signature = inspect.signature(opt._init_group).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature):
        lists = [[] for _ in opt._state_keys]
    else:
        positional = [p for p in signature if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        lists = [[] for _ in range(len(positional) - 4)]
    opt._init_group(group, params, grads, steps, *lists)
    op, state_lists, extra = opt._op_for(group, lists[: len(opt._state_keys)])
    args = (params, grads, *state_lists, steps, torch.tensor(group["lr"], dtype=torch.float64))
    kwargs = dict(opt._op_kwargs(group), stochastic_rounding=group["stochastic_rounding"], seed=group["seed"], **extra)
    return getattr(torch.ops.torchopt_ext, op).default, args, kwargs


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_opcheck_every_optimizer_op(name):
    params = [torch.randn(4, 3), torch.randn(5), torch.randn(())]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = getattr(tox, name)(params, **ALL_OPTIMIZERS[name])
    opt.step()  # state past its first step
    op, args, kwargs = _op_call_of(opt)
    torch.library.opcheck(op, args, kwargs, test_utils=OPCHECK_UTILS)


def test_every_registered_op_is_covered():
    # The dispatcher's list (dir(torch.ops.torchopt_ext) only shows ops already looked up).
    registered = {
        name.split("::")[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("torchopt_ext::") and name.endswith("_step_")
    }
    covered = {getattr(tox, name)._op for name in ALL_OPTIMIZERS}
    # Adam/AdamW with use_magma=True (opcheck in test_magma_adam.py) and
    # PRISM's NAdamW fallback (test_prism_nadamw_op_passes_opcheck below).
    covered |= {"adam_magma_step_", "prism_nadamw_step_"}
    assert registered == covered


def test_prism_nadamw_op_passes_opcheck():
    # PRISM's adam_nesterov fallback, with state past its first step.
    params = [torch.randn(5), torch.randn(())]
    args = (
        params,
        [torch.randn_like(p) for p in params],
        [torch.randn_like(p) for p in params],
        [torch.rand_like(p) for p in params],
        [torch.tensor(3.0) for _ in params],
        torch.tensor(0.01, dtype=torch.float64),
    )
    torch.library.opcheck(
        torch.ops.torchopt_ext.prism_nadamw_step_.default,
        args,
        dict(beta1=0.8, beta2=0.99, weight_decay=0.1),
        test_utils=OPCHECK_UTILS,
    )


def _two_stage_call(algo):
    params = [torch.randn(4, 3), torch.randn(5), torch.randn(())]
    grads = [3 * torch.randn_like(p) for p in params]
    m = [torch.randn_like(p) for p in params]
    v = [torch.rand_like(p) for p in params]
    steps = [torch.tensor(2.0) for _ in params]
    lr = torch.tensor(0.01, dtype=torch.float64)
    if algo == "lamb":
        kwargs = dict(
            beta1=0.9,
            beta2=0.999,
            eps=1e-6,
            weight_decay=0.1,
            bias_correction=True,
            grad_averaging=True,
            trust_clip=False,
            always_adapt=False,
            decoupled_decay=False,
            maximize=False,
            grad_divisor=torch.tensor(1.5, dtype=torch.float64),
        )
        return (params, grads, m, v, steps, lr), kwargs
    kwargs = dict(
        beta1=0.95,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.1,
        gamma=0.025,
        mars_type="mars-adamw",
        amsgrad=False,
        maximize=False,
    )
    last = [torch.randn_like(p) for p in params]
    return (params, grads, m, v, [], last, steps, lr), kwargs


@pytest.mark.parametrize("algo", ["lamb", "mars"])
def test_opcheck_two_stage_norm_ops(algo):
    # Stage 1 (the per-tensor squared norms a sharded step all-reduces) and
    # stage 2 taking them: both pass opcheck, and stage 1 writes nothing.
    args, kwargs = _two_stage_call(algo)
    norms = getattr(torch.ops.torchopt_ext, f"{algo}_norm_sqs").default
    torch.library.opcheck(norms, args, kwargs, test_utils=OPCHECK_UTILS)
    before = [[t.clone() for t in x] if isinstance(x, list) else x.clone() for x in args]
    sums = norms(*args, **kwargs)
    assert sums.shape == (3, 2 if algo == "lamb" else 1) and sums.dtype == torch.float64
    assert (sums > 0).all()
    for now, then in zip(args, before):
        for a, b in zip(now if isinstance(now, list) else [now], then if isinstance(then, list) else [then]):
            assert torch.equal(a, b)
    step = getattr(torch.ops.torchopt_ext, f"{algo}_step_").default
    torch.library.opcheck(step, args, dict(kwargs, norm_sqs=sums), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("algo", ["lamb", "mars"])
def test_two_stage_step_equals_fused_step_bitwise(algo):
    fused, kwargs = _two_stage_call(algo)
    split = [[t.clone() for t in x] if isinstance(x, list) else x.clone() for x in fused]
    step = getattr(torch.ops.torchopt_ext, f"{algo}_step_")
    norms = getattr(torch.ops.torchopt_ext, f"{algo}_norm_sqs")
    for _ in range(3):
        step(*fused, **kwargs)
        step(*split, **kwargs, norm_sqs=norms(*split, **kwargs))
    for a, b in zip(fused, split):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(x, y)


def test_norm_sqs_of_the_wrong_shape_or_dtype_is_refused():
    args, kwargs = _two_stage_call("lamb")
    with pytest.raises(ValueError, match=r"norm_sqs must have shape \(3, 2\)"):
        torch.ops.torchopt_ext.lamb_step_(*args, **kwargs, norm_sqs=torch.zeros(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="norm_sqs must be float64"):
        torch.ops.torchopt_ext.lamb_step_(*args, **kwargs, norm_sqs=torch.zeros(3, 2))
