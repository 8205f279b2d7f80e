"""torch.distributed.checkpoint (DCP) with torchopt_ext's AdamW under FSDP2:
save at world size 2, load at world size 1 and 4 (resharding the DTensor
state, through DCP's lr=0 init step), continue, and match the run that was
never interrupted. The global batch is the same at every world size (each
rank takes its slice), so the trajectories agree up to reduction order."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from distributed_utils import run_distributed
from test_distributed import MLP, TOL, _shard
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import torchopt_ext.optim as topt

GLOBAL_BATCH = 8  # divisible by 1, 2 and 4
STEPS_BEFORE, STEPS_AFTER = 3, 4
ADAMW = dict(lr=1e-2, weight_decay=0.1)


def _train(model, opt, rank: int, world_size: int, steps: range) -> None:
    rows = GLOBAL_BATCH // world_size
    mine = slice(rank * rows, (rank + 1) * rows)
    for i in steps:
        data = torch.Generator().manual_seed(100 + i)
        x = torch.randn(GLOBAL_BATCH, 8, generator=data)
        y = torch.randn(GLOBAL_BATCH, 3, generator=data)
        torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()


def _full_params(model) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def _save_worker(rank: int, world_size: int, ckpt: str, ref_path: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    _shard(model, world_size)
    opt = topt.AdamW(model.parameters(), **ADAMW)
    _train(model, opt, rank, world_size, range(STEPS_BEFORE))
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=ckpt)
    _train(model, opt, rank, world_size, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    full = _full_params(model)
    if rank == 0:
        torch.save(full, ref_path)


def _load_worker(rank: int, world_size: int, ckpt: str, ref_path: str) -> None:
    from torch.distributed.tensor import DTensor

    torch.manual_seed(1)  # different init: everything must come from the checkpoint
    model = MLP()
    _shard(model, world_size)
    opt = topt.AdamW(model.parameters(), **ADAMW)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    for p in model.parameters():
        st = opt.state[p]
        assert float(st["step"]) == STEPS_BEFORE, f"step {float(st['step'])} after loading"
        for key in ("exp_avg", "exp_avg_sq"):
            assert isinstance(st[key], DTensor) and st[key].placements == p.placements, key
            assert torch.isfinite(st[key].to_local()).all()
    _train(model, opt, rank, world_size, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    full = _full_params(model)
    if rank == 0:
        ref = torch.load(ref_path)
        for name, value in full.items():
            torch.testing.assert_close(value, ref[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
        print(f"[load ws={world_size}] max err", max((full[n] - ref[n]).abs().max().item() for n in full))


@pytest.mark.distributed
def test_dcp_adamw_save_2_load_1_and_4_continues_identically(tmp_path):
    ckpt = os.fspath(tmp_path / "ckpt")
    ref_path = os.fspath(tmp_path / "uninterrupted.pt")
    run_distributed(_save_worker, 2, ckpt, ref_path)
    run_distributed(_load_worker, 1, ckpt, ref_path)
    run_distributed(_load_worker, 4, ckpt, ref_path)
