"""Per-param work side by side on a multi-threaded CPU (common::run_side_by_side).

With two intra-op threads, Kron's and KronPSGD's factor updates and the Newton-Schulz steps of
Muon, PRISM and MARS-Shampoo run one param per thread with single-threaded ATen
ops. The math is the same, so 20 steps agree with one thread to rounding (fp64:
GEMM blocking may differ by thread count), and a step made under inference mode
runs on the workers as well (their thread-local state comes from the caller).
"""

from __future__ import annotations

import pytest
import torch

import torchopt_ext.optim as tox

# (name, factory, shapes): several params of unequal cost, so the schedule
# both runs a large one alone and balances the rest.
CASES = {
    "Kron": (
        lambda ps: tox.Kron(ps, lr=0.01, preconditioner_update_probability=1.0, seed=3, batch_equal_shapes=False),
        [(96, 64), (96, 64), (200, 40), (130,), (130,), (8, 6, 5)],
    ),
    "KronPSGD": (lambda ps: tox.KronPSGD(ps, lr=0.01), [(64, 48), (64, 48), (128, 96), (40,), (40, 200)]),
    "Muon": (lambda ps: tox.Muon(ps, lr=0.02), [(64, 48), (64, 48), (128, 96), (40, 200)]),
    "PRISM": (lambda ps: tox.PRISM(ps, lr=0.02), [(64, 48), (64, 48), (128, 96), (40, 200)]),
    "MARS-Shampoo": (
        lambda ps: tox.MARS(ps, lr=1e-2, mars_type="mars-shampoo"),
        [(64, 48), (64, 48), (128, 96), (40, 200)],
    ),
}


def _run(name, threads, dtype, inference=False):
    make, shapes = CASES[name]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        with torch.inference_mode(inference):
            params = [torch.randn(s, dtype=dtype) for s in shapes]
            start = torch.cat([p.flatten() for p in params])
            grads = [[torch.randn(s, dtype=dtype) for s in shapes] for _ in range(20)]
            opt = make(params)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g
                opt.step()
        return torch.cat([p.detach().flatten() for p in params]), start
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_two_threads_match_one(name, dtype):
    one, start = _run(name, 1, dtype)
    two, _ = _run(name, 2, dtype)
    assert (one - start).abs().max() > 1e-2  # the params moved: a real trajectory
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(two, one, rtol=tol, atol=tol)
    torch.testing.assert_close(_run(name, 2, dtype, inference=True)[0], two, rtol=0, atol=0)
