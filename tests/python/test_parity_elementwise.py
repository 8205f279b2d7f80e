"""Parity of NAdamW, RAdam, QHAdamW and Lion with their public oracles
(torch.optim.NAdam / RAdam, qhoptim, lion-pytorch) over 20 steps."""

import warnings

import pytest
import torch
from helpers import SHAPES, assert_params_close, run_side_by_side

import torchopt_ext.optim as tox

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config",
    [
        dict(lr=1e-2),
        dict(lr=1e-2, weight_decay=0.1),
        dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=False),
        dict(lr=3e-3, betas=(0.8, 0.99), momentum_decay=1e-2, eps=1e-6, maximize=True),
    ],
)
def test_nadamw_matches_torch_nadam(config, dtype):
    config = dict(config)
    decoupled = config.pop("decoupled_weight_decay", True)
    wd = config.pop("weight_decay", 0.0)
    ours, ref = run_side_by_side(
        lambda ps: tox.NAdamW(ps, weight_decay=wd, decoupled_weight_decay=decoupled, **config),
        lambda ps: torch.optim.NAdam(ps, weight_decay=wd, decoupled_weight_decay=decoupled, foreach=False, **config),
        SHAPES,
        dtype,
    )
    assert_params_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config",
    [
        dict(lr=1e-2),
        dict(lr=1e-2, weight_decay=0.1),
        dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, maximize=True),
    ],
)
def test_radam_matches_torch(config, dtype):
    ours, ref = run_side_by_side(
        lambda ps: tox.RAdam(ps, **config),
        lambda ps: torch.optim.RAdam(ps, foreach=False, **config),
        SHAPES,
        dtype,
    )
    assert_params_close(ours, ref, dtype)


def test_radam_switches_to_rectified_steps_at_step_6():
    # Steps 1-5 are plain bias-corrected momentum steps: with a constant
    # gradient g the update is exactly lr * g; step 6 is not.
    p = torch.zeros(4, dtype=torch.float64)
    opt = tox.RAdam([p], lr=0.1)
    deltas = []
    for _ in range(6):
        before = p.clone()
        p.grad = torch.full((4,), 2.0, dtype=torch.float64)
        opt.step()
        deltas.append((before - p)[0].item())
    assert deltas[:5] == pytest.approx([0.2] * 5, rel=1e-12)
    assert deltas[5] != pytest.approx(0.2, rel=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config",
    [
        dict(lr=1e-2),
        dict(lr=1e-2, nus=(0.7, 1.0), betas=(0.995, 0.999)),
        dict(lr=1e-2, nus=(0.7, 0.8), weight_decay=0.1),
        dict(lr=1e-2, nus=(0.0, 0.5), eps=1e-6),
    ],
)
def test_qhadamw_matches_qhoptim(config, dtype):
    qhoptim = pytest.importorskip("qhoptim.pyt", reason="qhoptim is a test dependency (see .ci/test.sh)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # qhoptim uses deprecated add_ overloads
        ours, ref = run_side_by_side(
            lambda ps: tox.QHAdamW(ps, **config),
            lambda ps: qhoptim.QHAdamW(ps, **config),
            SHAPES,
            dtype,
        )
    assert_params_close(ours, ref, dtype)


def test_qhadamw_with_unit_nus_is_adamw():
    ours, ref = run_side_by_side(
        lambda ps: tox.QHAdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
        SHAPES,
        torch.float64,
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config",
    [
        dict(lr=1e-3),
        dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=0.1),
        dict(lr=3e-4, weight_decay=1e-2, decoupled_weight_decay=True),
    ],
)
def test_lion_matches_lion_pytorch(config, dtype):
    lion_pytorch = pytest.importorskip("lion_pytorch", reason="lion-pytorch is a test dependency")
    ours, ref = run_side_by_side(
        lambda ps: tox.Lion(ps, **config),
        lambda ps: lion_pytorch.Lion(ps, **config),
        SHAPES,
        dtype,
    )
    assert_params_close(ours, ref, dtype)


def test_lion_maximize_is_descent_on_negated_gradient():
    p_max, p_min = torch.randn(9), None
    p_min = p_max.clone()
    a = tox.Lion([p_max], lr=0.01, maximize=True)
    b = tox.Lion([p_min], lr=0.01)
    for _ in range(5):
        g = torch.randn(9)
        p_max.grad, p_min.grad = g.clone(), -g
        a.step()
        b.step()
    assert torch.equal(p_max, p_min)
