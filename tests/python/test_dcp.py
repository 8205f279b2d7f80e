"""torch.distributed.checkpoint (DCP) with torchopt_ext optimizers under FSDP2:
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
from helpers import INIT_ONLY_FIRST_STEP
from test_distributed import (
    ELEMENTWISE,
    MLP,
    OWNER_STATE_KEYS,
    SHARDED_NORMS,
    SHARDED_STATS,
    TOL,
    WHOLE_STATE_KEYS,
    WHOLE_TENSOR,
    _shard,
    expected_placements,
    make_optimizer,
)
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

GLOBAL_BATCH = 8  # divisible by 1, 2 and 4
STEPS_BEFORE, STEPS_AFTER = 3, 4
# Every optimizer the FSDP2 tests cover (configs from helpers.ALL_OPTIMIZERS),
# PRISM on the ownership path (Muon takes it by default), and the optimizers
# with owner-held preconditioner state (KronPSGD, WhiteKron by default).
NAMES = ELEMENTWISE + SHARDED_NORMS + WHOLE_TENSOR + SHARDED_STATS + ["PRISM_owner", "Kron_owner", "SOAP"]
# SOAP's eigenbases depend on ulp-level differences of the gradient (see
# test_distributed.ULP_SENSITIVE): every rank takes the whole batch, so the
# averaged gradient is the same at every world size (mean of 1, 2 or 4 equal
# values: exact) and the resumed run can be compared.
SAME_BATCH = {"SOAP"}


def _train(model, opt, rank: int, world_size: int, steps: range, same_batch: bool = False) -> None:
    rows = GLOBAL_BATCH // world_size
    mine = slice(None) if same_batch else slice(rank * rows, (rank + 1) * rows)
    for i in steps:
        data = torch.Generator().manual_seed(100 + i)
        x = torch.randn(GLOBAL_BATCH, 8, generator=data)
        y = torch.randn(GLOBAL_BATCH, 3, generator=data)
        torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        opt.zero_grad()


def _full_params(model) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def _save_worker(rank: int, world_size: int, root: str) -> None:
    from torch.distributed.tensor import DTensor

    for name in NAMES:
        torch.manual_seed(0)
        model = MLP()
        _shard(model, world_size)
        opt = make_optimizer(name, model.parameters())
        same = name in SAME_BATCH
        _train(model, opt, rank, world_size, range(STEPS_BEFORE), same)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        if name in OWNER_STATE_KEYS and world_size > 1:
            # Owner-held state is saved sharded like any DTensor state (one Shard(0) part per rank).
            for entry in state["optim"]["state"].values():
                for key in OWNER_STATE_KEYS[name]:
                    if key in entry and entry[key].dim() > 0:
                        assert isinstance(entry[key], DTensor), f"{name}: {key} saved as {type(entry[key])}"
        dcp.save(state, checkpoint_id=os.path.join(root, name))
        _train(model, opt, rank, world_size, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), same)
        full = _full_params(model)
        if rank == 0:
            torch.save(full, os.path.join(root, f"{name}.pt"))


def _load_worker(rank: int, world_size: int, root: str) -> None:
    from torch.distributed.tensor import DTensor

    failures = []
    for name in NAMES:
        torch.manual_seed(1)  # different init: everything must come from the checkpoint
        model = MLP()
        _shard(model, world_size)
        opt = make_optimizer(name, model.parameters())
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=os.path.join(root, name))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        for pname, p in model.named_parameters():
            st = opt.state[p]
            # SOAP's first call only builds its preconditioner (no step counted).
            expected = STEPS_BEFORE - (name in INIT_ONLY_FIRST_STEP)
            assert float(st["step"]) == expected, f"{name}: step {float(st['step'])} after loading"
            if name in OWNER_STATE_KEYS and world_size > 1:
                _check_owner_held(opt, name, rank)
            for key, value in st.items():
                if key in WHOLE_STATE_KEYS and not isinstance(value, DTensor):
                    # Factors kept whole on every rank (KronPSGD, WhiteKron), as saved.
                    assert torch.isfinite(value).all(), f"{name}: {pname}.{key} not finite"
                elif torch.is_tensor(value) and value.dim() > 0:
                    assert isinstance(value, DTensor), f"{name}: {pname}.{key} loaded as a plain tensor"
                    want = expected_placements(name, key, p)
                    assert tuple(value.placements) == want, f"{name}: {pname}.{key} placements"
                    assert torch.isfinite(value.to_local()).all(), f"{name}: {pname}.{key} not finite"
        _train(model, opt, rank, world_size, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), name in SAME_BATCH)
        full = _full_params(model)
        if rank == 0:
            ref = torch.load(os.path.join(root, f"{name}.pt"))
            err = max((full[n] - ref[n]).abs().max().item() for n in full)
            print(f"[load ws={world_size}] {name}: max |resumed - uninterrupted| = {err:.3g}")
            for pname, value in full.items():
                try:
                    torch.testing.assert_close(value, ref[pname], **TOL)
                except AssertionError as e:
                    failures.append(f"{name} {pname}: {e}")
    assert not failures, "\n".join(failures)


def _check_owner_held(opt, name: str, rank: int) -> None:
    """After loading: owner-held state on the (new) owner only, whole and finite."""
    params, plan = opt._owner_plan(opt.param_groups[0])
    for p, m in zip(params, plan.layouts):
        for key in OWNER_STATE_KEYS[name]:
            if m.owner == rank:
                assert key in opt.state[p], f"{name}: the owner (rank {rank}) lacks {key}"
                assert torch.isfinite(opt.state[p][key]).all(), f"{name}: {key} not finite"
            else:
                assert key not in opt.state[p], f"{name}: rank {rank} keeps {key} of rank {m.owner}'s param"


@pytest.mark.distributed
def test_dcp_save_at_2_load_at_1_and_4_continues_identically(tmp_path):
    root = os.fspath(tmp_path)
    run_distributed(_save_worker, 2, root)
    run_distributed(_load_worker, 1, root)
    run_distributed(_load_worker, 4, root)
