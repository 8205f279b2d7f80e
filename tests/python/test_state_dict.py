"""state_dict / load_state_dict round trips continue bitwise."""

import copy
import functools
import io

import pytest
import torch
from helpers import ALL_OPTIMIZERS as CONFIGS

import torchopt_ext.optim as tox


def _grads(params, steps):
    return [[torch.randn_like(p) for p in params] for _ in range(steps)]


def _apply(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_through_torch_save_continues_bitwise(name):
    cls = getattr(tox, name)
    params = [torch.randn(5, 3), torch.randn(4)]
    first, second = _grads(params, 6), _grads(params, 6)

    opt = cls(params, **CONFIGS[name])
    _apply(opt, params, first)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    _apply(opt, params, second)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [p.clone() for p in saved["params"]]
    resumed = cls(resumed_params, **CONFIGS[name])
    resumed.load_state_dict(saved["opt"])
    _apply(resumed, resumed_params, second)

    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


def test_state_dict_has_torch_compatible_keys():
    p = torch.randn(3)
    opt = tox.AdamW([p], amsgrad=True)
    p.grad = torch.randn(3)
    opt.step()
    state = opt.state_dict()["state"][0]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert state["step"].dtype == torch.float32


@pytest.mark.parametrize(
    "ours_cls, ref_cls",
    [
        (tox.AdamW, torch.optim.AdamW),
        (tox.NAdamW, functools.partial(torch.optim.NAdam, weight_decay=0.01, decoupled_weight_decay=True)),
        (tox.RAdam, torch.optim.RAdam),
    ],
    ids=["AdamW", "NAdamW", "RAdam"],
)
def test_resume_from_torch_optim_state_dict(ours_cls, ref_cls):
    # torch.optim's state keys and step format are ours too, so a torch
    # checkpoint resumes under torchopt_ext with the same trajectory.
    params_ref = [torch.randn(6, 2, dtype=torch.float64)]
    params_ours = [p.clone() for p in params_ref]
    grads = _grads(params_ref, 8)
    ref = ref_cls(params_ref, lr=1e-2)
    for group in ref.param_groups:
        group["foreach"] = False
    _apply(ref, params_ref, grads[:4])
    ours = ours_cls(params_ours, lr=1e-2)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    with torch.no_grad():
        params_ours[0].copy_(params_ref[0])
    _apply(ref, params_ref, grads[4:])
    _apply(ours, params_ours, grads[4:])
    torch.testing.assert_close(params_ours[0], params_ref[0], rtol=1e-12, atol=1e-12)


def test_load_keeps_fp32_state_for_bf16_params():
    p = torch.randn(8, dtype=torch.bfloat16)
    opt = tox.AdamW([p], state_dtype=torch.float32)
    p.grad = torch.randn(8, dtype=torch.bfloat16)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    fresh = tox.AdamW([p], state_dtype=torch.float32)
    fresh.load_state_dict(sd)
    state = fresh.state[p]
    assert state["exp_avg"].dtype == torch.float32
    assert state["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(state["exp_avg"], opt.state[p]["exp_avg"])


def test_load_state_dict_with_mismatched_shapes_fails_clearly():
    p = torch.randn(4)
    opt = tox.AdamW([p])
    p.grad = torch.randn(4)
    opt.step()
    sd = opt.state_dict()
    q = torch.randn(5)
    other = tox.AdamW([q])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(sd)


def test_load_state_dict_with_wrong_group_size_fails():
    opt = tox.SGD([torch.randn(2), torch.randn(3)], lr=0.1)
    other = tox.SGD([torch.randn(2)], lr=0.1)
    with pytest.raises(ValueError, match="size"):
        other.load_state_dict(opt.state_dict())


DROP_INS = [
    (tox.SGD, torch.optim.SGD),
    (tox.Adam, torch.optim.Adam),
    (tox.AdamW, torch.optim.AdamW),
    (tox.NAdamW, torch.optim.NAdam),
    (tox.RAdam, torch.optim.RAdam),
    (tox.Adafactor, torch.optim.Adafactor),
    (tox.Muon, torch.optim.Muon),
]


@pytest.mark.parametrize("ours_cls, ref_cls", DROP_INS, ids=[c.__name__ for c, _ in DROP_INS])
def test_accepts_every_torch_optim_argument(ours_cls, ref_cls):
    # A drop-in takes every argument of its torch.optim namesake, the
    # implementation switches (foreach / fused / capturable) included.
    import inspect

    ours = inspect.signature(ours_cls.__init__).parameters
    theirs = inspect.signature(ref_cls.__init__).parameters
    assert [name for name in theirs if name not in ours] == []
    switches = {k: False for k in ("foreach", "fused", "capturable", "differentiable") if k in theirs}
    p = torch.randn(4, 3)
    opt = ours_cls([p], **switches)
    assert all(opt.param_groups[0][k] is False for k in switches)
    if "differentiable" in theirs:
        with pytest.raises(ValueError, match="differentiable"):
            ours_cls([p], differentiable=True)
