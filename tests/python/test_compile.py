"""torch.compile(opt.step, fullgraph=True) runs the ops without graph breaks
and matches eager."""

import pytest
import torch
from helpers import ALL_OPTIMIZERS, INIT_ONLY_FIRST_STEP, eager_then_compiled

import torchopt_ext.optim as tox


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_compiled_step_matches_eager(name):
    def make_opt(ps):
        return getattr(tox, name)(ps, **ALL_OPTIMIZERS[name])

    eager, compiled, opt = eager_then_compiled(make_opt, lambda: [torch.randn(8, 5), torch.randn(5), torch.randn(())])
    for a, b in zip(eager, compiled):
        if name == "LAMB":
            # LAMB's global grad norm is traced ATen math, which Inductor
            # reduces in another order: equal to rounding, not bitwise.
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b)
    expected_steps = 3 if name in INIT_ONLY_FIRST_STEP else 4
    assert all(s["step"].item() == expected_steps for s in opt.state.values())


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_compiled_step_with_tensor_lr_and_scheduler_does_not_recompile():
    torch._dynamo.reset()
    params = [torch.randn(6, 3)]
    opt = tox.Adam(params, lr=torch.tensor(0.01))
    counter = torch._dynamo.testing.CompileCounter()
    # Compile the bound step before the scheduler wraps opt.step (its wrapper
    # lives in a module dynamo deliberately skips).
    step = torch.compile(opt.step, fullgraph=True, backend=counter)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(5):
        params[0].grad = torch.randn(6, 3)
        step()
        sched.step()
    # One frame for the first step (state created) and one afterwards.
    assert counter.frame_count <= 2
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.01 * 0.5**5)
