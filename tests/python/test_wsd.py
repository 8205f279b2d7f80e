"""WSD schedule: rollfast's boundary values, every shape against formulas
written from the spec, explicit step counts, resume, and bad input."""

import math
import re

import pytest
import torch

import torchopt_ext
import torchopt_ext.optim as tox
from torchopt_ext.schedules import WSD


def lrs_over(total, steps=None, peak=1.0, **kwargs):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=peak)
    sched = WSD(opt, total, **kwargs)
    out = []
    for _ in range(steps or total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def reference_factor(k, total, warmup, decay, shape_w, shape_d, r, pw=1.0, pd=1.0, rate=5.0):
    def shape(name, x, p):
        return {
            "linear": x,
            "cosine": 0.5 * (1 - math.cos(math.pi * x)),
            "power": x**p,
            "exponential": math.expm1(rate * x) / math.expm1(rate),
        }[name]

    t_c = total - decay
    if k <= warmup:
        return shape(shape_w, (k + 1) / (warmup + 1), pw)
    if k > t_c:
        x = min((k - t_c) / max(total - 1 - t_c, 1), 1.0)
        return max(r + (1 - r) * (1 - shape(shape_d, x, pd)), 0.0)
    return 1.0


def test_rollfast_boundary_values():
    # rollfast tests/test_wsd.py: T=20, fractions 0.1/0.2, final ratio 0.1.
    lrs = lrs_over(20, warmup_fraction=0.1, decay_fraction=0.2, final_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(1 / 3)
    assert lrs[1] < 1.0
    assert lrs[2] == 1.0
    assert lrs[16] == 1.0
    assert lrs[17] < 1.0
    assert lrs[19] == pytest.approx(0.1)


@pytest.mark.parametrize("shape", ["linear", "cosine", "power", "exponential"])
def test_every_shape_matches_the_formula(shape):
    total, r = 50, 0.05
    lrs = lrs_over(
        total,
        steps=total + 5,
        peak=3e-3,
        warmup_fraction=0.2,
        decay_fraction=0.3,
        warmup_shape=shape.upper(),  # any case is accepted
        decay_shape=shape,
        final_lr_ratio=r,
        warmup_power=2.0,
        decay_power=0.5,
        exponential_rate=3.0,
    )
    for k, lr in enumerate(lrs):
        expected = 3e-3 * reference_factor(k, total, 10, 15, shape, shape, r, pw=2.0, pd=0.5, rate=3.0)
        assert lr == pytest.approx(expected, rel=1e-14, abs=0), k
    # Past the end the final ratio is held.
    assert lrs[-1] == pytest.approx(3e-3 * r)


def test_explicit_step_counts_override_fractions():
    lrs = lrs_over(100, warmup_fraction=0.5, decay_fraction=0.5, warmup_steps=4, decay_steps=10)
    for k, lr in enumerate(lrs):
        assert lr == pytest.approx(reference_factor(k, 100, 4, 10, "linear", "linear", 0.0), rel=1e-14), k
    assert lrs[4] == 1.0 and lrs[90] == 1.0 and lrs[91] < 1.0 and lrs[99] == 0.0


def test_no_warmup_no_decay_is_constant():
    assert lrs_over(10, warmup_fraction=0.0, decay_fraction=0.0) == [1.0] * 10


def test_each_group_scales_its_own_peak_and_tensor_lr_works():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = tox.AdamW([{"params": [a], "lr": torch.tensor(0.1)}, {"params": [b], "lr": 0.02}])
    sched = WSD(opt, 10, warmup_steps=1, decay_steps=2)
    for k in range(10):
        factor = sched.lr_factor(k)
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 * factor, rel=1e-6)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.02 * factor, rel=1e-14)
        a.grad, b.grad = torch.ones(3), torch.ones(3)
        opt.step()
        sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)


def test_state_dict_resume_continues_exactly():
    def make():
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=0.5)
        return opt, WSD(opt, 30, decay_shape="cosine", final_lr_ratio=0.2)

    opt, sched = make()
    full = []
    for _ in range(30):
        full.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt1, sched1 = make()
    for _ in range(12):
        opt1.step()
        sched1.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt1.state_dict())
    sched2.load_state_dict(sched1.state_dict())
    resumed = []
    for _ in range(18):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == full[12:]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=10, warmup_fraction=1.5), "warmup_fraction"),
        (dict(total_steps=10, decay_fraction=-0.1), "decay_fraction"),
        (dict(total_steps=10, warmup_fraction=0.6, decay_fraction=0.5), "warmup_steps + decay_steps"),
        (dict(total_steps=10, warmup_steps=-1), "warmup_steps"),
        (dict(total_steps=10, decay_steps=2.5), "decay_steps"),
        (dict(total_steps=10, warmup_shape="cubic"), "warmup_shape"),
        (dict(total_steps=10, decay_shape="step"), "decay_shape"),
        (dict(total_steps=10, final_lr_ratio=2.0), "final_lr_ratio"),
        (dict(total_steps=10, warmup_power=0.0), "warmup_power"),
        (dict(total_steps=10, decay_power=-1.0), "decay_power"),
        (dict(total_steps=10, exponential_rate=0.0), "exponential_rate"),
    ],
)
def test_bad_options_name_the_argument(kwargs, argument):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=f"(?i)invalid {re.escape(argument)}"):
        WSD(opt, **kwargs)
    assert opt.param_groups[0]["lr"] == 0.1  # a rejected schedule changes nothing


def test_factor_op_is_the_cpp_math():
    # The Python scheduler holds no formula of its own: the op answers directly.
    factor = torch.ops.torchopt_ext.wsd_lr_factor(
        17,
        total_steps=20,
        warmup_fraction=0.1,
        decay_fraction=0.2,
        warmup_steps=None,
        decay_steps=None,
        warmup_shape="linear",
        decay_shape="linear",
        final_lr_ratio=0.1,
        warmup_power=1.0,
        decay_power=1.0,
        exponential_rate=5.0,
    )
    assert factor == pytest.approx(0.7)
    assert torchopt_ext.schedules.WSD is WSD
