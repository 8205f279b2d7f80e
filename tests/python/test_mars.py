"""MARS against a float64 reference written from the spec (no clean oracle is on PyPI)."""

import pytest
import torch
from helpers import run_side_by_side
from reference.mars import MarsReference

import torchopt_ext.optim as tox

# 2-D tensors take the MARS branch, the rest MARS's AdamW branch; one large
# matrix so the unit-norm clip of c triggers, one small so it does not.
SHAPES = [(40, 30), (3, 5), (7,), (), (2, 3, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(lr=1e-2, weight_decay=0.1, gamma=0.05),
        dict(lr=1e-2, amsgrad=True, weight_decay_1d=0.0, betas_1d=(0.8, 0.9)),
        dict(lr=1e-3, mars_type="mars-lion", weight_decay=0.1),
        dict(lr=1e-2, optimize_1d=True),
    ],
    ids=["defaults", "wd-gamma", "amsgrad", "lion", "optimize_1d"],
)
def test_mars_matches_float64_reference(config, dtype):
    ours, ref = run_side_by_side(
        lambda ps: tox.MARS(ps, **config),
        lambda ps: MarsReference(ps, **config),
        SHAPES,
        dtype,
    )
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_first_step_amplifies_the_gradient_before_clipping():
    # g_prev = 0 on step 1: c = (1 + gamma*b1/(1-b1)) g; with a small g (no
    # clip) and beta1 = 0 the first moment is exactly c.
    p = torch.zeros(3, 2, dtype=torch.float64)
    opt = tox.MARS([p], betas=(0.5, 0.99), gamma=0.1)
    g = torch.full((3, 2), 0.01, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    expected_c = (1 + 0.1 * 0.5 / 0.5) * g
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.5 * expected_c, rtol=1e-14, atol=0)
    torch.testing.assert_close(opt.state[p]["last_grad"], g, rtol=0, atol=0)


def test_large_corrected_gradient_is_clipped_to_unit_norm():
    p = torch.zeros(4, 4, dtype=torch.float64)
    opt = tox.MARS([p], betas=(0.0, 0.99))
    p.grad = torch.full((4, 4), 10.0, dtype=torch.float64)
    opt.step()
    # With beta1 = 0 the first moment is the clipped c itself.
    assert opt.state[p]["exp_avg"].norm().item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mars_type="mars-shampoo"), "Newton-Schulz"),
        (dict(mars_type="adamw"), "mars_type"),
        (dict(is_approx=False), "is_approx"),
        (dict(gamma=-0.1), "gamma"),
        (dict(betas_1d=(0.9, 1.5)), "betas\\[1\\]"),
        (dict(mars_type="mars-lion", amsgrad=True), "amsgrad"),
    ],
)
def test_mars_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.MARS([torch.randn(3, 3)], **kwargs)
