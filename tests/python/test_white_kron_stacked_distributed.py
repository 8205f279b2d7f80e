"""WhiteKron with stacked (L, ...) DTensor params sharded along L (Shard(0),
1-D mesh, gloo on CPU, 2 ranks): every rank steps its own whole slices on its
local shards, with no gather or other collective, and must reproduce one
process's run bitwise (see distributed_utils for the harness)."""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_distributed

import torchopt_ext.optim as topt
from torchopt_ext.optim import _base

# On 2 ranks: L = 3 (2 + 1 slices) padded dense tiles, L = 5 (3 + 2) 1-D
# slices, L = 2 (1 + 1) a second dense param (its tiles follow the first's in
# the stack), L = 1 (rank 1 holds no slice) row strips (max_size_dense 20).
SHAPES = [(3, 20, 13), (5, 6), (2, 9, 9), (1, 10, 23)]
STEPS = 6
# noise_scale 1e-2: wrong draws show in every tensor.
KWARGS = dict(lr=0.05, seed=7, block_size=8, max_size_dense=20, balance_every=2, noise_scale=1e-2, stacked=True)
# (param dtype, options): bf16 factors and mu with skew, fp32 factors with quad on fp64 params.
RUNS = [(torch.float32, dict(update_style="skew")), (torch.float64, dict(update_style="quad", dtype=torch.float32))]


def _grads(dtype):
    gen = torch.Generator().manual_seed(11)
    inits = [torch.randn(s, dtype=dtype, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, dtype=dtype, generator=gen) for s in SHAPES] for _ in range(STEPS)]
    return inits, grads


def _single_process(dtype, options):
    inits, grads = _grads(dtype)
    params = [p.clone() for p in inits]
    opt = topt.WhiteKron(params, **KWARGS, **options)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _gathers_in_step(opt) -> int:
    """opt.step(), counting DTensor.full_tensor calls."""
    from torch.distributed.tensor import DTensor

    calls = []
    original = DTensor.full_tensor

    def counting(t, *args, **kwargs):
        calls.append(t)
        return original(t, *args, **kwargs)

    DTensor.full_tensor = counting
    try:
        opt.step()
    finally:
        DTensor.full_tensor = original
    return len(calls)


def _stacked_shard_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    for dtype, options in RUNS:
        inits, grads = _grads(dtype)
        params = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in inits]
        opt = topt.WhiteKron(params, **KWARGS, **options)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            comm = _base._COMM["bytes"]
            assert _gathers_in_step(opt) == 0, "the step gathered a DTensor"
            assert _base._COMM["bytes"] == comm
        ref_params, ref = _single_process(dtype, options)
        for p, q in zip(params, ref_params):
            state, other = opt.state[p], ref.state[q]
            for key in ("ql", "qr", "lip_l", "lip_r", "mu"):
                # Sharded along L like the param (whole slices per rank).
                assert tuple(state[key].placements) == (Shard(0),), key
                assert state[key].to_local().shape[0] == p.to_local().shape[0], key
                assert torch.equal(state[key].full_tensor(), other[key]), (key, tuple(q.shape))
            assert float(state["step"]) == STEPS  # also where this rank holds no slice
            assert torch.equal(p.detach().full_tensor(), q.detach()), tuple(q.shape)
        if rank == 0:
            print(f"stacked Shard(0) vs one process, {dtype} {options['update_style']}: bitwise equal")

    # A state_dict of the sharded state (DTensors) resumes bitwise.
    inits, grads = _grads(torch.float32)
    runs = []
    for resume in (False, True):
        params = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in inits]
        opt = topt.WhiteKron(params, **KWARGS)
        for k, step in enumerate(grads):
            if resume and k == 3:
                saved = opt.state_dict()
                opt = topt.WhiteKron(params, **dict(KWARGS, lr=0.5))
                opt.load_state_dict(saved)
            for p, g in zip(params, step):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            opt.step()
        runs.append([p.detach().full_tensor() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))

    # Other placements keep a clear error.
    replicated = torch.nn.Parameter(distribute_tensor(torch.randn(3, 4, 4), mesh, [Replicate()]))
    with pytest.raises(NotImplementedError, match="Shard\\(0\\)"):
        topt.WhiteKron([replicated], stacked=True)


@pytest.mark.distributed
def test_white_kron_stacked_shard0_matches_single_process():
    run_distributed(_stacked_shard_worker, 2)
