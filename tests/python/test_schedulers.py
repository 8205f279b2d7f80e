"""LR schedulers and tensor learning rates."""

import pytest
import schedulefree  # test dependency (.ci/test.sh)
import torch

import torchopt_ext.optim as tox


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_step_lr_schedule_matches_torch(name):
    p_ours = torch.randn(10, dtype=torch.float64)
    p_ref = p_ours.clone()
    extra = {"momentum": 0.9} if name == "SGD" else {}
    ours = getattr(tox, name)([p_ours], lr=0.1, **extra)
    ref = getattr(torch.optim, name)([p_ref], lr=0.1, foreach=False, **extra)
    s_ours = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=0.2, total_steps=25)
    s_ref = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=0.2, total_steps=25)
    for _ in range(25):
        g = torch.randn(10, dtype=torch.float64)
        p_ours.grad, p_ref.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        s_ours.step()
        s_ref.step()
        assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    torch.testing.assert_close(p_ours, p_ref, rtol=1e-12, atol=1e-12)


def test_tensor_lr_equals_float_lr():
    p_float = torch.randn(10, dtype=torch.float64)
    p_tensor = p_float.clone()
    a = tox.AdamW([p_float], lr=0.01)
    b = tox.AdamW([p_tensor], lr=torch.tensor(0.01, dtype=torch.float64))
    for _ in range(5):
        g = torch.randn(10, dtype=torch.float64)
        p_float.grad, p_tensor.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(p_float, p_tensor)


@pytest.mark.parametrize(
    "ours_cls, ref_name, kwargs",
    [
        (tox.ScheduleFreeAdamW, "AdamWScheduleFree", dict(lr=0.01, warmup_steps=3)),
        (tox.ScheduleFreeSGD, "SGDScheduleFree", dict(lr=0.1, momentum=0.9)),
    ],
)
def test_schedulefree_follows_a_scheduler_like_the_package(ours_cls, ref_name, kwargs):
    # Schedule-Free reads the group's lr every step, so a scheduler on top
    # changes both the step size and (through lr_max) the averaging weights.
    p_ours = torch.randn(10, dtype=torch.float64)
    p_ref = p_ours.clone()
    ours = ours_cls([p_ours], **kwargs)
    ref = getattr(schedulefree, ref_name)([p_ref], **kwargs)
    ref.train()
    s_ours = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=0.2, total_steps=25, cycle_momentum=False)
    s_ref = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=0.2, total_steps=25, cycle_momentum=False)
    for _ in range(25):
        g = torch.randn(10, dtype=torch.float64)
        p_ours.grad, p_ref.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        s_ours.step()
        s_ref.step()
    torch.testing.assert_close(p_ours, p_ref, rtol=1e-12, atol=1e-12)
