"""Parity with torch.optim (single-tensor reference paths) over 20 steps."""

import pytest
import torch
from helpers import SHAPES, assert_params_close, run_side_by_side

import torchopt_ext.optim as tox

DTYPES = [torch.float32, torch.float64]

SGD_CONFIGS = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02),
    dict(lr=0.05, momentum=0.5, maximize=True),
    dict(lr=0.05, weight_decay=0.1, maximize=True),
]

ADAM_CONFIGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
    dict(lr=1e-2, amsgrad=True, weight_decay=0.01),
    dict(lr=1e-2, maximize=True, amsgrad=True),
    dict(lr=3e-3, betas=(0.0, 0.5)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_sgd_matches_torch(config, dtype):
    ours, ref = run_side_by_side(
        lambda ps: tox.SGD(ps, **config),
        lambda ps: torch.optim.SGD(ps, foreach=False, **config),
        SHAPES,
        dtype,
    )
    assert_params_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ADAM_CONFIGS)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_family_matches_torch(name, config, dtype):
    ours, ref = run_side_by_side(
        lambda ps: getattr(tox, name)(ps, **config),
        lambda ps: getattr(torch.optim, name)(ps, foreach=False, fused=False, **config),
        SHAPES,
        dtype,
    )
    assert_params_close(ours, ref, dtype)


def test_adam_decoupled_flag_matches_torch_adamw():
    config = dict(lr=1e-2, weight_decay=0.1)
    ours, ref = run_side_by_side(
        lambda ps: tox.Adam(ps, decoupled_weight_decay=True, **config),
        lambda ps: torch.optim.AdamW(ps, foreach=False, **config),
        SHAPES,
        torch.float64,
    )
    assert_params_close(ours, ref, torch.float64)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_non_contiguous_grads(name):
    config = dict(lr=1e-2, weight_decay=0.1)
    if name == "SGD":
        config["momentum"] = 0.9
    ours, ref = run_side_by_side(
        lambda ps: getattr(tox, name)(ps, **config),
        lambda ps: getattr(torch.optim, name)(ps, foreach=False, **config),
        SHAPES,
        torch.float32,
        non_contiguous=True,
    )
    assert_params_close(ours, ref, torch.float32)


def test_non_contiguous_param_is_updated_in_place():
    base = torch.randn(6, 8)
    p_ours = base.clone().t()  # a transposed view: not contiguous
    p_ref = base.clone().t()
    assert not p_ours.is_contiguous()
    ours = tox.AdamW([p_ours], lr=0.1)
    ref = torch.optim.AdamW([p_ref], lr=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn(8, 6)
        p_ours.grad = g.clone()
        p_ref.grad = g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p_ours, p_ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_multiple_param_groups(name):
    def groups(ps):
        return [
            {"params": ps[:3]},
            {"params": ps[3:], "lr": 0.02, "weight_decay": 0.3},
        ]

    extra = {"momentum": 0.9} if name == "SGD" else {}
    ours, ref = run_side_by_side(
        lambda ps: getattr(tox, name)(groups(ps), lr=0.05, **extra),
        lambda ps: getattr(torch.optim, name)(groups(ps), lr=0.05, foreach=False, **extra),
        SHAPES,
        torch.float64,
    )
    assert_params_close(ours, ref, torch.float64)


def test_params_without_grad_are_left_alone():
    a, b = torch.randn(5), torch.randn(5)
    b_before = b.clone()
    opt = tox.AdamW([a, b], lr=0.1)
    a.grad = torch.randn(5)
    opt.step()
    assert torch.equal(b, b_before)
    assert b not in opt.state
    assert opt.state[a]["step"].item() == 1


def test_closure_runs_with_grad_and_returns_loss():
    w = torch.randn(4, requires_grad=True)
    opt = tox.SGD([w], lr=0.1)
    target = torch.ones(4)

    def closure():
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        return loss

    before = ((w.detach() - target) ** 2).sum()
    loss = opt.step(closure)
    assert torch.equal(loss.detach(), before)
    after = ((w.detach() - target) ** 2).sum()
    assert after < before
