"""torchopt_ext.clip: the standalone raw global-norm clip and SpikeGuard
(rollfast.md §2.3 steps 1 and 6): values, the device-side skip through
found_inf, the host-read fallback, equality with PRISM's built-in guard,
compile and opcheck."""

import copy

import pytest
import torch

import torchopt_ext
import torchopt_ext.optim as tox
from torchopt_ext.clip import SpikeGuard, raw_global_grad_clip_


def _params(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(5, 4, dtype=dtype), torch.randn(7, dtype=dtype), torch.randn((), dtype=dtype)]


def _global_norm(ts):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in ts)).item()


def test_clip_scales_to_max_norm_on_a_spike_and_leaves_grads_alone_otherwise():
    ps = _params()
    for p in ps:
        p.grad = torch.randn_like(p) * 10
    norm = _global_norm([p.grad for p in ps])
    before = [p.grad.clone() for p in ps]
    spike = raw_global_grad_clip_(ps, norm * 2)
    assert spike.dtype == torch.bool and spike.dim() == 0 and not spike
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))  # bitwise: a multiply by 1
    spike = raw_global_grad_clip_(ps, 3.0)
    assert spike
    assert _global_norm([p.grad for p in ps]) == pytest.approx(3.0, rel=1e-12)
    for p, b in zip(ps, before):
        torch.testing.assert_close(p.grad, b * (3.0 / norm), rtol=1e-12, atol=0)


def test_nan_norm_is_no_spike():
    p = torch.randn(4)
    p.grad = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    assert not raw_global_grad_clip_([p], 0.1)
    assert torch.isnan(p.grad[1]) and p.grad[0] == 1.0


def test_clip_compiles_without_graph_breaks():
    # fullgraph=True fails on any data-dependent host read.
    ps = _params(torch.float32)
    for p in ps:
        p.grad = torch.randn_like(p) * 10
    expected = [p.grad.clone() for p in ps]
    assert not raw_global_grad_clip_([{"params": [torch.zeros(1)]}], 1.0)  # a param group without grads
    eager_spike = torch.ops.torchopt_ext.raw_global_grad_clip_(expected, 1.0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda gs: torch.ops.torchopt_ext.raw_global_grad_clip_(gs, 1.0), fullgraph=True)
    grads = [p.grad for p in ps]
    spike = compiled(grads)
    assert bool(spike) == bool(eager_spike)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_opcheck():
    grads = [torch.randn(3, 4) * 5, torch.randn(6)]
    torch.library.opcheck(
        torch.ops.torchopt_ext.raw_global_grad_clip_.default,
        (grads, 1.0),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def _run(opt, params, grads, closure_loss=None):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def _spiky_grads(params, steps=8, seed=1):
    # Every third step is 100x larger: a spike for max_norm = 20.
    torch.manual_seed(seed)
    return [[torch.randn_like(p) * (100.0 if k % 3 == 2 else 1.0) for p in params] for k in range(steps)]


@pytest.mark.parametrize("permissive", [True, False])
def test_guard_equals_prisms_built_in_spike_protection(permissive):
    # PRISM's own raw clip sees only its PRISM-routed grads: matrices only here.
    torch.manual_seed(3)
    a = [torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)]
    b = [p.clone() for p in a]
    kwargs = dict(lr=0.02, ns_dtype=torch.float64, seed=1)
    built_in = tox.PRISM(a, raw_global_grad_clip=20.0, permissive_spike_protection=permissive, **kwargs)
    guard = SpikeGuard(tox.PRISM(b, **kwargs), 20.0, permissive=permissive)
    grads = _spiky_grads(a)
    _run(built_in, a, grads)
    _run(guard, b, grads)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)
    assert guard.num_spikes.item() == 2
    for x, y in zip(a, b):
        assert built_in.state[x]["step"].item() == guard.state[y]["step"].item() == (8 if permissive else 6)


def test_strict_guard_skips_on_the_device_for_fused_optimizers():
    ps = _params(torch.float32)
    opt = tox.AdamW(ps, lr=1e-2, weight_decay=0.1)
    guard = SpikeGuard(opt, 20.0, permissive=False)
    assert guard._device_skip()
    grads = _spiky_grads(ps, steps=3)
    _run(guard, ps, grads[:2])
    snapshot = [p.clone() for p in ps], copy.deepcopy(opt.state_dict()["state"])
    _run(guard, ps, grads[2:])  # the spike
    assert bool(guard.spike)
    assert all(torch.equal(p, q) for p, q in zip(ps, snapshot[0]))
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(v, snapshot[1][i][k]) for k, v in s.items())
    assert not hasattr(opt, "found_inf")  # handed over for the step only


@pytest.mark.parametrize(
    "make",
    [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: tox.ScheduleFree(torch.optim.SGD(ps, lr=0.1))],
)
def test_strict_guard_falls_back_to_a_host_read(make):
    ps = _params()
    opt = make(ps)
    guard = SpikeGuard(opt, 20.0, permissive=False)
    assert not guard._device_skip()
    grads = _spiky_grads(ps, steps=3)
    _run(guard, ps, grads[:2])
    before = [p.clone() for p in ps]
    _run(guard, ps, grads[2:])
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


def test_permissive_guard_is_the_optimizer_on_clipped_grads():
    a = _params(torch.float32)
    b = [p.clone() for p in a]
    guard = SpikeGuard(torch.optim.AdamW(a, lr=1e-2), 20.0)
    plain = torch.optim.AdamW(b, lr=1e-2)
    for gs in _spiky_grads(a):
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        guard.step()
        torch.nn.utils.clip_grad_norm_(b, 20.0)  # torch's clip: the same rule up to its eps
        plain.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_guard_runs_the_closure_and_passes_the_state_through():
    model = torch.nn.Linear(3, 1)
    opt = tox.AdamW(model.parameters(), lr=1e-2)
    guard = SpikeGuard(opt, 1.0)
    x = torch.randn(8, 3)

    def closure():
        guard.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = guard.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert guard.state_dict()["state"] and guard.param_groups is opt.param_groups


def test_guard_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_norm"):
        SpikeGuard(torch.optim.SGD([torch.randn(2)], lr=0.1), 0.0)
    with pytest.raises(TypeError, match="optimizer"):
        SpikeGuard(object(), 1.0)
    p = torch.randn(2)
    p.grad = torch.randn(2)
    with pytest.raises(ValueError, match="max_norm"):
        raw_global_grad_clip_([p], -1.0)


def test_module_is_exported():
    assert torchopt_ext.clip.SpikeGuard is SpikeGuard
