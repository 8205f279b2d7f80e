"""Kron with stacked (L, ...) DTensor params sharded along L (Shard(0), 1-D
mesh, gloo on CPU): every rank steps its own whole slices with no gather and
must reproduce one process's run (see distributed_utils for the harness)."""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_distributed

import torchopt_ext.optim as topt

# L = 3 and L = 5 on 2 ranks: uneven shards (2 + 1, 3 + 2 slices).
SHAPES = [(3, 6, 5), (5, 4)]
STEPS = 8
KWARGS = dict(
    lr=0.02,
    seed=7,
    weight_decay=0.1,
    use_magma=True,
    preconditioner_update_probability=0.7,
    stacked=True,
    stacked_chunk_size=2,
)


def _grads(dtype):
    gen = torch.Generator().manual_seed(11)
    inits = [torch.randn(s, dtype=dtype, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, dtype=dtype, generator=gen) for s in SHAPES] for _ in range(STEPS)]
    return inits, grads


def _single_process(dtype):
    inits, grads = _grads(dtype)
    params = [p.clone() for p in inits]
    opt = topt.Kron(params, **KWARGS)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _stacked_shard_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        inits, grads = _grads(dtype)
        params = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in inits]
        opt = topt.Kron(params, **KWARGS)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = distribute_tensor(g, mesh, [Shard(0)])
            opt.step()
        ref_params, ref = _single_process(dtype)
        err = 0.0
        for p, q in zip(params, ref_params):
            state, other = opt.state[p], ref.state[q]
            # State is sharded along L like the param (whole slices per rank).
            for key in ("Q", "L", "mu", "magma_score"):
                assert tuple(state[key].placements) == (Shard(0),), key
                assert state[key].to_local().shape[0] == p.to_local().shape[0], key
                err = max(err, float((state[key].full_tensor().double() - other[key].double()).abs().max()))
            assert float(state["step"]) == STEPS
            err = max(err, float((p.detach().full_tensor().double() - q.detach().double()).abs().max()))
        # Slices drawn on other ranks were drawn and dropped: one generator state.
        assert torch.equal(opt.param_groups[0]["rng_state"], ref.param_groups[0]["rng_state"])
        assert err <= tol, (dtype, err)
        if rank == 0:
            print(f"stacked Shard(0) vs one process, {dtype}: max |diff| = {err:.3e}")

    # Other placements and group-wide norms keep a clear error.
    replicated = torch.nn.Parameter(distribute_tensor(torch.randn(3, 4, 4), mesh, [Replicate()]))
    replicated.grad = distribute_tensor(torch.randn(3, 4, 4), mesh, [Replicate()])
    with pytest.raises(NotImplementedError, match="Shard\\(0\\)"):
        topt.Kron([replicated], stacked=True).step()
    sharded = torch.nn.Parameter(distribute_tensor(torch.randn(3, 4, 4), mesh, [Shard(0)]))
    sharded.grad = distribute_tensor(torch.randn(3, 4, 4), mesh, [Shard(0)])
    with pytest.raises(NotImplementedError, match="raw_global_grad_clip"):
        topt.Kron([sharded], stacked=True, raw_global_grad_clip=1.0).step()


@pytest.mark.distributed
def test_kron_stacked_shard0_matches_single_process():
    run_distributed(_stacked_shard_worker, 2)
