"""The foreach baselines of benchmarks/bench_cuda.py (benchmarks/spec_references.py,
written from the spec) compute the same update as torchopt_ext's optimizers,
so the GPU comparison times equal work. CPU, float64, 5 steps."""

import sys
from pathlib import Path

import pytest
import torch

import torchopt_ext.optim as tox

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import spec_references  # noqa: E402

OURS = {
    "QHAdamW": lambda ps: tox.QHAdamW(ps, lr=1e-2, nus=(0.7, 0.8), weight_decay=0.1),
    "Lion": lambda ps: tox.Lion(ps, lr=1e-3, weight_decay=0.1),
    "SophiaG": lambda ps: tox.SophiaG(ps, lr=1e-2, weight_decay=0.1),
    "LAMB": lambda ps: tox.LAMB(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5),
    "MARS": lambda ps: tox.MARS(ps, lr=1e-2, weight_decay=0.1, optimize_1d=True),
}
REFS = {
    "QHAdamW": dict(lr=1e-2, nus=(0.7, 0.8), weight_decay=0.1),
    "Lion": dict(lr=1e-3, weight_decay=0.1),
    "SophiaG": dict(lr=1e-2, weight_decay=0.1),
    "LAMB": dict(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5),
    "MARS": dict(lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(spec_references.REFERENCES))
def test_spec_reference_matches_torchopt_ext(name):
    gen = torch.Generator().manual_seed(5)
    shapes = [(33, 5), (7,), (), (300,)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(5)]
    ours = [x.clone() for x in init]
    ref = [x.clone() for x in init]
    opt = OURS[name](ours)
    for p in ref:
        p.grad = torch.zeros_like(p)
    step = spec_references.REFERENCES[name](ref, **REFS[name])
    for gs in grads:
        for p, q, g in zip(ours, ref, gs):
            p.grad = g.clone()
            q.grad.copy_(g)
        opt.step()
        step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # The update moved the params (the check is not vacuous).
    assert any(not torch.equal(a, x) for a, x in zip(ours, init))
