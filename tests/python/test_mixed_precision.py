"""Reduced-precision params: fp32 math, optional fp32 state, stochastic rounding."""

import pytest
import torch

import torchopt_ext.optim as tox


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_low_precision_params_with_fp32_state_track_fp32_run(name, dtype):
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    if name == "SGD":
        kwargs["momentum"] = 0.9
    master = torch.randn(257)
    low = master.to(dtype)
    ref = low.float()  # the fp32 run starts from the same rounded values
    opt_low = getattr(tox, name)([low], state_dtype=torch.float32, **kwargs)
    opt_ref = getattr(tox, name)([ref], **kwargs)
    for _ in range(20):
        g = torch.randn(257).to(dtype)
        low.grad = g
        ref.grad = g.float()
        opt_low.step()
        opt_ref.step()
    state = opt_low.state[low]
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    assert state[key].dtype == torch.float32
    # Each step rounds to the storage type once; 20 steps stay within a few ulps.
    resolution = 2**-7 if dtype == torch.bfloat16 else 2**-10
    assert (low.float() - ref).abs().max() <= 4 * resolution * ref.abs().max()


def test_default_state_dtype_follows_param():
    p = torch.randn(4, dtype=torch.bfloat16)
    opt = tox.Adam([p])
    p.grad = torch.randn(4, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16


def _sr_run(seed, stochastic=True, steps=10):
    torch.manual_seed(0)
    p = torch.randn(4096).to(torch.bfloat16)
    opt = tox.AdamW([p], lr=1e-3, state_dtype=torch.float32, stochastic_rounding=stochastic, seed=seed)
    for _ in range(steps):
        p.grad = torch.randn(4096).to(torch.bfloat16)
        opt.step()
    return p


def test_stochastic_rounding_is_deterministic_given_seed():
    assert torch.equal(_sr_run(seed=7), _sr_run(seed=7))
    assert not torch.equal(_sr_run(seed=7), _sr_run(seed=8))
    assert not torch.equal(_sr_run(seed=7), _sr_run(seed=7, stochastic=False))


def test_stochastic_rounding_is_unbiased():
    # Many tiny SGD steps of size far below bf16's resolution at 1.0: round to
    # nearest never moves the param; stochastic rounding moves it by the right
    # amount on average.
    n, steps, lr = 20000, 50, 1e-4
    p_sr = torch.ones(n, dtype=torch.bfloat16)
    p_rn = torch.ones(n, dtype=torch.bfloat16)
    sr = tox.SGD([p_sr], lr=lr, stochastic_rounding=True, seed=1)
    rn = tox.SGD([p_rn], lr=lr)
    for _ in range(steps):
        p_sr.grad = -torch.ones(n, dtype=torch.bfloat16)
        p_rn.grad = -torch.ones(n, dtype=torch.bfloat16)
        sr.step()
        rn.step()
    assert torch.equal(p_rn, torch.ones(n, dtype=torch.bfloat16))
    expected = 1.0 + steps * lr
    assert abs(p_sr.float().mean().item() - expected) < 2e-4
