"""Adafactor's staged op (``adafactor_stage_``), the path of FSDP2-sharded
params: the three stages back to back equal the fused step bit for bit, and
stages run on row / batch / element shards with their statistics summed (as
the front end's all-reduces do) equal the unsharded step. In-process, so
uneven and empty shards are cheap to cover; tests/python/test_distributed.py
runs the same path on real gloo ranks."""

import math

import pytest
import torch

import torchopt_ext.optim as tox
from torchopt_ext.optim.adafactor import _stats_size

OP_KW = dict(
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
SHAPES = [(13, 8), (3, 6), (5, 4, 6), (13,), (), (1, 1), (0, 4)]


def _state(params, beta1, state_dtype=None):
    rows = [torch.zeros(p.shape[:-1] + (1,), dtype=state_dtype or p.dtype) for p in params if p.dim() >= 2]
    cols = [
        torch.zeros(p.shape[:-2] + (1,) + p.shape[-1:], dtype=state_dtype or p.dtype) for p in params if p.dim() >= 2
    ]
    variances = [torch.zeros(p.shape, dtype=state_dtype or p.dtype) for p in params if p.dim() < 2]
    exp_avgs = [torch.zeros(p.shape, dtype=state_dtype or p.dtype) for p in params] if beta1 is not None else []
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    return rows, cols, variances, exp_avgs, steps


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    return params


@pytest.mark.parametrize(
    "dtype,state_dtype,extra",
    [
        (torch.float32, None, {}),
        (torch.float32, None, dict(beta1=0.9, weight_decay=0.1, maximize=True)),
        (torch.float64, None, dict(relative_step=False, scale_parameter=False, d=1.5)),
        (torch.bfloat16, torch.float32, dict(beta1=0.5, stochastic_rounding=True, seed=7)),
        (torch.float32, None, dict(eps1=0.0)),  # the exact per-element form (no row/column split)
    ],
    ids=["fp32", "fp32-beta1-wd-maximize", "fp64-no-relative", "bf16-sr", "eps1-zero"],
)
def test_stages_back_to_back_equal_the_fused_step_bitwise(dtype, state_dtype, extra):
    kw = OP_KW | extra
    fused_p, staged_p = _tensors(dtype), _tensors(dtype)
    fused_s, staged_s = _state(fused_p, kw["beta1"], state_dtype), _state(staged_p, kw["beta1"], state_dtype)
    lr = torch.tensor(0.05, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in fused_p]
        scale = torch.tensor([4.0]) if step == 2 else None  # AMP unscaling happens in stage 1 only
        if scale is not None:
            grads = [g * 4 for g in grads]
        fg, sg = [g.clone() for g in grads], [g.clone() for g in grads]
        rows, cols, var, avg, steps = fused_s
        torch.ops.torchopt_ext.adafactor_step_(fused_p, fg, rows, cols, var, avg, steps, lr, grad_scale=scale, **kw)
        rows, cols, var, avg, steps = staged_s
        stats = [torch.zeros(_stats_size(p), dtype=torch.float64) for p in staged_p]
        for stage in (1, 2, 3):
            torch.ops.torchopt_ext.adafactor_stage_(
                stage, staged_p, sg, rows, cols, var, avg, steps, lr, stats, grad_scale=scale, **kw
            )
        for a, b in zip(fg, sg):
            assert torch.equal(a, b)
    for a, b in zip(fused_p + sum(fused_s, []), staged_p + sum(staged_s, [])):
        assert torch.equal(a, b), (a, b)


def _chunks(t, world, dim=0):
    """torch.chunk along dim padded with empty pieces to `world` (FSDP2's split)."""
    if t.dim() == 0:
        return [t] + [t.new_empty((0,))] * 0
    pieces = list(torch.chunk(t, world, dim=dim)) if t.shape[dim] else []
    empty = list(t.shape)
    empty[dim] = 0
    return pieces + [t.new_empty(empty)] * (world - len(pieces))


def _run_sharded(world, params, grads_per_step, kw, lr):
    """Every "rank" runs the stages on its shards; stats are summed between
    stages over ranks the way Adafactor._staged_step slices them."""
    shards = [[_chunks(p, world)[r].clone() for p in params] for r in range(world)]
    states = []
    for r in range(world):
        ps = shards[r]
        rows = [torch.zeros(p.shape[:-1] + (1,)) for p in ps if p.dim() >= 2]
        # A 2-D param's col_var is whole on every rank; a 3-D one's is split with its matrices.
        cols = [
            torch.zeros((1, q.shape[-1]) if q.dim() == 2 else p.shape[:-2] + (1,) + p.shape[-1:])
            for p, q in zip(ps, params)
            if p.dim() >= 2
        ]
        var = [torch.zeros(p.shape) for p in ps if p.dim() < 2]
        avg = [torch.zeros(p.shape) for p in ps] if kw["beta1"] is not None else []
        steps = [torch.zeros(()) for _ in ps]
        states.append((rows, cols, var, avg, steps))
    for grads in grads_per_step:
        gshards = [[_chunks(g, world)[r].clone() for g in grads] for r in range(world)]
        stats = [[torch.zeros(_stats_size(p), dtype=torch.float64) for p in shards[r]] for r in range(world)]

        def call(stage, r, gshards=gshards, stats=stats):
            torch.ops.torchopt_ext.adafactor_stage_(
                stage, shards[r], gshards[r], *states[r][:4], states[r][4], lr, stats[r], **kw
            )

        def reduce(pick, stats=stats):
            for i, p in enumerate(params):
                for sl in pick(i, p):
                    total = sum(stats[r][i][sl] for r in range(world))
                    for r in range(world):
                        stats[r][i][sl] = total

        for r in range(world):
            call(1, r)
        reduce(lambda i, p: [slice(0, 2)] + ([slice(3, None)] if p.dim() == 2 else []))
        for r in range(world):
            call(2, r)
        reduce(lambda i, p: [slice(2, 3)])
        for r in range(world):
            call(3, r)
    return shards, states


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_simulated_shards_match_the_unsharded_step(world, beta1):
    kw = OP_KW | dict(beta1=beta1, weight_decay=0.1)
    # 0-d params cannot be sharded; every other shape is (uneven / empty at 4).
    params = [p for p in _tensors(torch.float32) if p.dim() > 0]
    gen = torch.Generator().manual_seed(2)
    grads_per_step = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(12)]
    lr = torch.tensor(0.05, dtype=torch.float64)
    ref = [p.clone() for p in params]
    ref_state = _state(ref, beta1)
    for grads in grads_per_step:
        torch.ops.torchopt_ext.adafactor_step_(ref, [g.clone() for g in grads], *ref_state[:4], ref_state[4], lr, **kw)
    shards, states = _run_sharded(world, params, grads_per_step, kw, lr)
    worst = 0.0
    for i, p in enumerate(ref):
        got = torch.cat([shards[r][i] for r in range(world)]) if p.dim() else shards[0][i]
        worst = max(worst, (got - p).abs().max().item() if p.numel() else 0.0)
        torch.testing.assert_close(got, p, rtol=1e-6, atol=1e-6)
    # Row EMAs follow their rows; column EMAs of 2-D params are identical on
    # every rank and equal the unsharded ones.
    factored = [i for i, p in enumerate(ref) if p.dim() >= 2]
    for k, i in enumerate(factored):
        row = torch.cat([states[r][0][k] for r in range(world)])
        torch.testing.assert_close(row, ref_state[0][k], rtol=1e-6, atol=0)
        if ref[i].dim() == 2:
            for r in range(1, world):
                assert torch.equal(states[r][1][k], states[0][1][k])
            torch.testing.assert_close(states[0][1][k], ref_state[1][k], rtol=1e-6, atol=0)
        else:
            col = torch.cat([states[r][1][k] for r in range(world)])
            torch.testing.assert_close(col, ref_state[1][k], rtol=1e-6, atol=0)
    print(f"world {world} beta1 {beta1}: max |sharded - fused| = {worst:.3g}")
    assert worst > 0.0 or world == 1  # the sums really were split (else this test proves nothing)


def test_found_inf_skips_every_stage():
    params = _tensors(torch.float32)
    before = [p.clone() for p in params]
    rows, cols, var, avg, steps = _state(params, None)
    grads = [torch.ones_like(p) for p in params]
    stats = [torch.zeros(_stats_size(p), dtype=torch.float64) for p in params]
    lr = torch.tensor(0.1, dtype=torch.float64)
    for stage in (1, 2, 3):
        torch.ops.torchopt_ext.adafactor_stage_(
            stage, params, grads, rows, cols, var, avg, steps, lr, stats, found_inf=torch.ones(1), **OP_KW
        )
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(float(s) == 0 for s in steps)
    assert all(not s.any() for s in stats + rows + cols + var)


def test_stage_op_rejects_bad_stats_and_stage():
    params = [torch.randn(4, 3)]
    rows, cols, var, avg, steps = _state(params, None)
    lr = torch.tensor(0.1, dtype=torch.float64)
    args = (params, [torch.randn(4, 3)], rows, cols, var, avg, steps, lr)
    with pytest.raises(ValueError, match=r"stats\[0\] must be a contiguous float64 tensor of shape \(8,\) on cpu"):
        torch.ops.torchopt_ext.adafactor_stage_(1, *args, [torch.zeros(7, dtype=torch.float64)], **OP_KW)
    with pytest.raises(ValueError, match="stats must have one tensor per param"):
        torch.ops.torchopt_ext.adafactor_stage_(1, *args, [], **OP_KW)
    with pytest.raises(ValueError, match="stage must be 1"):
        torch.ops.torchopt_ext.adafactor_stage_(4, *args, [torch.zeros(8, dtype=torch.float64)], **OP_KW)
    assert float(steps[0]) == 0  # rejected calls touch nothing


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_op_passes_opcheck(stage):
    params = [torch.randn(5, 3), torch.randn(4)]
    rows, cols, var, avg, steps = _state(params, 0.9)
    stats = [torch.rand(_stats_size(p), dtype=torch.float64) + 1 for p in params]
    for s, p in zip(stats, params):
        s[0] = p.numel()
        if p.dim() >= 2:
            s[3] = p.shape[-2]
    steps = [torch.ones(()) for _ in params]
    args = (
        stage,
        params,
        [torch.randn_like(p) for p in params],
        rows,
        cols,
        var,
        avg,
        steps,
        torch.tensor(0.1, dtype=torch.float64),
        stats,
    )
    torch.library.opcheck(torch.ops.torchopt_ext.adafactor_stage_.default, args, OP_KW | dict(beta1=0.9))


def test_plain_tensors_take_the_fused_op():
    # No DTensors: one adafactor_step_ call per group, as before the staged path.
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = tox.Adafactor([p])
    p.grad = torch.randn(4, 3)
    calls = []
    original = opt._staged_step
    opt._staged_step = lambda *a: calls.append(a) or original(*a)
    opt.step()
    assert not calls and math.isfinite(float(p.detach().sum()))
