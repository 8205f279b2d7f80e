"""LAMB against a float64 reference written from the spec (timm, the usual oracle, needs
torchvision, which has no CPU build on this machine)."""

import pytest
import torch
from helpers import SHAPES, run_side_by_side
from reference.lamb import LambReference

import torchopt_ext.optim as tox


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(lr=1e-2, max_grad_norm=None, weight_decay=0.1),
        dict(lr=1e-2, bias_correction=False, always_adapt=True, weight_decay=0.0),
        dict(lr=1e-2, trust_clip=True, grad_averaging=False),
        dict(lr=1e-2, decoupled_decay=True, weight_decay=0.1, max_grad_norm=0.5),
        dict(lr=1e-2, weight_decay=0.0),  # plain clipped Adam(eps=1e-6)
    ],
    ids=["defaults", "no-clip", "always-adapt", "trust-clip", "decoupled", "no-decay"],
)
def test_lamb_matches_float64_reference(config, dtype):
    ours, ref = run_side_by_side(
        lambda ps: tox.LAMB(ps, **config), lambda ps: LambReference(ps, **config), SHAPES, dtype
    )
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_global_clip_spans_param_groups():
    # Two groups, one clip: the same as one group holding both params.
    a1, b1 = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    a2, b2 = a1.clone(), b1.clone()
    split = tox.LAMB([{"params": [a1]}, {"params": [b1]}], lr=1e-2, max_grad_norm=0.1)
    joint = tox.LAMB([a2, b2], lr=1e-2, max_grad_norm=0.1)
    for _ in range(5):
        ga, gb = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
        a1.grad, b1.grad, a2.grad, b2.grad = ga.clone(), gb.clone(), ga.clone(), gb.clone()
        split.step()
        joint.step()
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_trust_ratio_scales_the_step_to_the_weight_norm():
    # With weight decay 0 and always_adapt, ||delta|| = lr * ||p||.
    p = torch.randn(50, dtype=torch.float64) * 3
    before = p.clone()
    opt = tox.LAMB([p], lr=0.01, weight_decay=0.0, always_adapt=True, max_grad_norm=None)
    p.grad = torch.randn(50, dtype=torch.float64)
    opt.step()
    assert (before - p).norm().item() == pytest.approx(0.01 * before.norm().item(), rel=1e-12)


def test_grads_are_not_modified():
    p = torch.randn(10)
    g = torch.randn(10) * 100
    p.grad = g.clone()
    tox.LAMB([p]).step()
    assert torch.equal(p.grad, g)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(max_grad_norm=0.0), "max_grad_norm"), (dict(eps=-1.0), "eps"), (dict(betas=(0.9, 1.0)), "betas")],
)
def test_lamb_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.LAMB([torch.randn(3)], **kwargs)
