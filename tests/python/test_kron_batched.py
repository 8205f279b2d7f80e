"""Kron's batched updates across problems of one shape (issue 7) and the
batched-vs-loop choice (issue 5): `batch_equal_shapes` True (bmm stacks of
equal-shape params / stacked slices) and False (one problem at a time) draw
the same numbers in the same order, so they agree to rounding; None picks
per shape (on the CPU: batched only up to psgd::kCpuBatchedMaxNumel = 8192
elements per problem)."""

from __future__ import annotations

import pytest
import torch

import torchopt_ext.optim as tox

MODES = ["Q0.5EQ1.5", "EQ", "QUAD", "NS", "EXP", "TAYLOR2", "HYPER"]
# Equal shapes interleaved with others (the draws must stay in group order):
# dense 2-D, 3-D, 1-D (diagonal), a 0-d and a lone shape.
SHAPES = [(6, 5), (7,), (6, 5), (3, 4, 2), (), (6, 5), (3, 4, 2), (7,), (5, 6)]
# Max |batched - loop| / max(|loop|, 1) over params, factors and Lipschitz
# estimates after 10 steps (the factors grow well past 1). Measured, every
# geometry: <= 1.2e-15 fp64, <= 5e-7 fp32.
TOL = {torch.float64: 1e-13, torch.float32: 5e-6}


def _run(shapes, dtype, batch, steps=10, stacked=False, **kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes]
    opt = tox.Kron(params, lr=0.02, seed=3, stacked=stacked, batch_equal_shapes=batch, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=dtype, generator=gen)
        opt.step()
    return params, opt


def _max_diff(a, b):
    pa, oa = a
    pb, ob = b
    err = 0.0
    for x, y in zip(pa, pb):
        for u, v in [(x, y)] + [(oa.state[x][k], ob.state[y][k]) for k in ("Q", "L")]:
            if u.numel():
                scale = float(v.double().abs().max().clamp_min(1.0))
                err = max(err, float((u.double() - v.double()).abs().max()) / scale)
    return err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_equal_shapes_batched_matches_per_param(mode, dtype):
    kw = dict(preconditioner_update_probability=1.0, preconditioner_mode=mode)
    batched = _run(SHAPES, dtype, True, **kw)
    loop = _run(SHAPES, dtype, False, **kw)
    err = _max_diff(batched, loop)
    assert err <= TOL[dtype], f"{mode} {dtype}: batched vs per-param {err}"
    # Same draws in the same order: the generators end in the same state.
    assert torch.equal(batched[1].param_groups[0]["rng_state"], loop[1].param_groups[0]["rng_state"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_stacked_batched_matches_slice_loop(mode, dtype):
    kw = dict(preconditioner_update_probability=1.0, preconditioner_mode=mode)
    shapes = [(4, 6, 5), (3, 2, 3, 4)]
    batched = _run(shapes, dtype, True, stacked=True, stacked_chunk_size=3, **kw)
    loop = _run(shapes, dtype, False, stacked=True, **kw)
    assert _max_diff(batched, loop) <= TOL[dtype]
    assert torch.equal(batched[1].param_groups[0]["rng_state"], loop[1].param_groups[0]["rng_state"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(memory_save_mode="one_diag"),
        dict(max_size_triangular=5),  # mixed dense / diagonal factors
        dict(whiten_grad=False, update_preconditioner_first=False),
        dict(grad_clip_mode="global_rms"),
        dict(preconditioner_update_probability=0.5, preconditioner_init_scale=None),
        dict(stacked_chunk_size=2),  # groups of at most 2 equal-shape params
    ],
)
def test_equal_shapes_batched_matches_per_param_with_options(kwargs):
    kwargs = {"preconditioner_update_probability": 1.0, **kwargs}
    err = _max_diff(_run(SHAPES, torch.float64, True, **kwargs), _run(SHAPES, torch.float64, False, **kwargs))
    assert err <= TOL[torch.float64]


def test_batching_is_not_a_no_op():
    # The two settings run different kernels (bmm vs mm chains): in float32
    # they differ in the last bits somewhere, so the comparisons above are
    # between two genuinely different code paths.
    kw = dict(preconditioner_update_probability=1.0)
    batched = _run(SHAPES, torch.float32, True, **kw)
    loop = _run(SHAPES, torch.float32, False, **kw)
    assert _max_diff(batched, loop) > 0.0


def test_default_batches_small_shapes_and_loops_over_large_ones_on_cpu():
    kw = dict(preconditioner_update_probability=1.0, steps=2)
    small = [(8, 8), (8, 8), (3,)]  # 64 elements: batched by default
    default = _run(small, torch.float32, None, **kw)
    assert _max_diff(default, _run(small, torch.float32, True, **kw)) == 0.0
    large = [(96, 96), (96, 96)]  # 9216 elements > 8192: one at a time
    default = _run(large, torch.float32, None, **kw)
    assert _max_diff(default, _run(large, torch.float32, False, **kw)) == 0.0


def test_default_batches_small_stacked_slices_and_loops_over_large_ones_on_cpu():
    kw = dict(preconditioner_update_probability=1.0, steps=2, stacked=True)
    small = [(3, 8, 8)]
    assert _max_diff(_run(small, torch.float32, None, **kw), _run(small, torch.float32, True, **kw)) == 0.0
    large = [(2, 96, 96)]
    assert _max_diff(_run(large, torch.float32, None, **kw), _run(large, torch.float32, False, **kw)) == 0.0


@pytest.mark.parametrize("value", [1, "yes", 0.5])
def test_batch_equal_shapes_is_validated(value):
    with pytest.raises(ValueError, match="batch_equal_shapes"):
        tox.Kron([torch.zeros(3, 3)], batch_equal_shapes=value)


def test_batch_equal_shapes_round_trips_and_old_checkpoints_get_the_default():
    p = torch.zeros(4, 4)
    opt = tox.Kron([p], batch_equal_shapes=False)
    state = opt.state_dict()
    assert state["param_groups"][0]["batch_equal_shapes"] is False
    del state["param_groups"][0]["batch_equal_shapes"]
    other = tox.Kron([p])
    other.load_state_dict(state)
    assert other.param_groups[0]["batch_equal_shapes"] is None
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups[0]["batch_equal_shapes"] is False


def test_batched_step_compiles():
    torch._dynamo.reset()

    def run(compiled):
        params, opt = _run([(4, 3), (4, 3)], torch.float32, True, steps=0, preconditioner_update_probability=1.0)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            step()
        return params

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
