"""GradScaler contract: found_inf skips the whole step; grad_scale unscales
the grads in the kernel (and writes them back)."""

import pytest
import torch
from helpers import ALL_OPTIMIZERS

import torchopt_ext.optim as tox


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_found_inf_skips_step_and_state(name):
    p = torch.randn(6)
    opt = getattr(tox, name)([p], **ALL_OPTIMIZERS[name])
    p.grad = torch.randn(6)
    opt.step()
    params_before = p.clone()
    state_before = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.randn(6)
    opt.grad_scale = torch.tensor(8.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(p, params_before)
    for k, v in opt.state[p].items():
        assert torch.equal(v, state_before[k]), k


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_grad_scale_unscales_in_kernel(name):
    p_scaled = torch.randn(6, dtype=torch.float64)
    p_plain = p_scaled.clone()
    scaled = getattr(tox, name)([p_scaled], **ALL_OPTIMIZERS[name])
    plain = getattr(tox, name)([p_plain], **ALL_OPTIMIZERS[name])
    for _ in range(3):
        g = torch.randn(6, dtype=torch.float64)
        p_scaled.grad = g * 1024.0
        p_plain.grad = g.clone()
        scaled.grad_scale = torch.tensor(1024.0)
        scaled.found_inf = torch.tensor(0.0)
        scaled.step()
        plain.step()
        torch.testing.assert_close(p_scaled.grad, g, rtol=0, atol=0)
    torch.testing.assert_close(p_scaled, p_plain, rtol=1e-12, atol=1e-12)


def test_with_torch_grad_scaler():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ref = torch.nn.Linear(4, 1)
    ref.load_state_dict(model.state_dict())
    opt = tox.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for step in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            if o is opt:
                scaler.scale(loss).backward()
                if step == 2:  # an overflow: the scaler must skip this step
                    model.weight.grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                if step != 2:
                    o.step()
    torch.testing.assert_close(model.weight, ref.weight, rtol=1e-5, atol=1e-6)
    assert opt.state[model.weight]["step"].item() == 4
