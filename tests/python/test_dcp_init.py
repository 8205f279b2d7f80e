"""DCP's optimizer-state initialisation (torch.distributed.checkpoint.state_dict
fakes zero grads, sets lr=0 and calls step(closure=None) when the state is
empty) must create every state entry, write no NaN/Inf and leave the params
unchanged. Single process, plain tensors: no process group needed."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_OPTIMIZERS
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import torchopt_ext.optim as topt


def _model() -> torch.nn.Module:
    # 2-D weights (Muon's matrices, Adafactor's factored moments) and 1-D biases.
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4))


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_dcp_lr0_init_step_is_a_no_op(name):
    model = _model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = getattr(topt, name)(model.parameters(), **ALL_OPTIMIZERS[name])
    if hasattr(opt, "train"):
        opt.train()
    lrs = [g["lr"] for g in opt.param_groups]
    osd = get_optimizer_state_dict(model, opt)
    assert osd["state"], f"{name}: DCP's init step created no state"
    for fqn, entries in osd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                assert torch.isfinite(value).all(), f"{name}: state {fqn}.{key} is not finite after the lr=0 step"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{name}: DCP's lr=0 step changed {k}"
    assert [g["lr"] for g in opt.param_groups] == lrs
    assert all(p.grad is None for p in model.parameters())
