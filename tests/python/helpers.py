"""Shared harness: run a torchopt_ext optimizer and a reference side by side
on identical gradients."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

# Shapes that exercise the kernels' corners: 0-d, tiny, one vector lane short
# of a block, block-sized plus a tail, and a 2-D odd shape.
SHAPES = [(), (1,), (7,), (1001,), (17, 33), (3, 4, 5)]


def make_params(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(shape, dtype=dtype) for shape in shapes]


def random_grad(p: torch.Tensor, non_contiguous: bool) -> torch.Tensor:
    if non_contiguous and p.dim() > 0:
        # Every other element of a wider tensor: same values pattern, strided.
        return torch.randn(*p.shape, 2, dtype=p.dtype)[..., 0]
    return torch.randn(p.shape, dtype=p.dtype)


def run_side_by_side(
    make_ours: Callable[[list], torch.optim.Optimizer],
    make_ref: Callable[[list], torch.optim.Optimizer],
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    steps: int = 20,
    non_contiguous: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Returns (ours, reference) params after `steps` steps on shared grads.

    make_* receive a list of param tensors (they may split it into groups)."""
    ours = make_params(shapes, dtype)
    ref = [p.clone() for p in ours]
    opt_ours = make_ours(ours)
    opt_ref = make_ref(ref)
    for _ in range(steps):
        for p, q in zip(ours, ref):
            g = random_grad(p, non_contiguous)
            p.grad = g.clone() if not non_contiguous else g
            q.grad = g.clone()
        opt_ours.step()
        opt_ref.step()
    return ours, ref


def eager_then_compiled(
    make_opt: Callable[[list], torch.optim.Optimizer],
    make_params: Callable[[], list[torch.Tensor]],
    steps: int = 4,
    seed: int = 1,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.optim.Optimizer]:
    """The same run eagerly and with torch.compile(opt.step, fullgraph=True):
    params made by make_params() and `steps` random grads after torch.manual_seed(seed).
    Returns (eager params, compiled params, the compiled run's optimizer)."""

    def run(compiled):
        torch.manual_seed(seed)
        params = make_params()
        grads = [[torch.randn_like(p) for p in params] for _ in range(steps)]
        opt = make_opt(params)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            step()
        return params, opt

    torch._dynamo.reset()
    eager, _ = run(False)
    compiled, opt = run(True)
    return eager, compiled, opt


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    # Tight enough that a wrong formula, order of weight decay or bias
    # correction fails by orders of magnitude; loose enough for the last-ulp
    # differences between torch's op-by-op rounding and the fused loop.
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12}
    return {"rtol": 2e-6, "atol": 2e-6}


def assert_params_close(ours, ref, dtype):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tolerances(dtype))


# Every torchopt_ext optimizer with a small config that exercises its state;
# shared by the generic tests (state_dict, compile, AMP, errors, opcheck).
ALL_OPTIMIZERS = {
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "Adam": dict(lr=1e-2, amsgrad=True, weight_decay=0.01),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "NAdamW": dict(lr=1e-2, weight_decay=0.1),
    "RAdam": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "QHAdamW": dict(lr=1e-2, nus=(0.7, 1.0), weight_decay=0.1),
    "Lion": dict(lr=1e-3, weight_decay=0.1),
    "MARS": dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
    "LAMB": dict(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5),
    "Muon": dict(lr=2e-2, weight_decay=0.1, adam_lr=1e-2),
    "PRISM": dict(lr=2e-2, weight_decay=0.1, adam_lr=1e-2, raw_global_grad_clip=100.0, seed=3),
    # Magma and the raw clip on so their state and paths are exercised too.
    "Kron": dict(lr=1e-2, weight_decay=0.1, raw_global_grad_clip=100.0, use_magma=True, seed=3),
    "ScheduleFreeAdamW": dict(lr=1e-2, weight_decay=0.1, warmup_steps=2, r=0.5),
    "ScheduleFreeSGD": dict(lr=0.05, momentum=0.9, weight_decay=0.01, warmup_steps=2),
    # h stays 0 in the generic tests (they never call update_hessian): sign steps.
    "SophiaH": dict(lr=1e-2, weight_decay=0.1, seed=3),
    "SophiaG": dict(lr=1e-2, weight_decay=0.1, seed=3),
    # beta1 set so the optional exp_avg state is exercised too.
    "Adafactor": dict(lr=1e-2, weight_decay=0.1, beta1=0.9),
    # Refresh every 2 steps so the QR path runs within the short generic runs;
    # precondition_1d so 1-D params get a factor too.
    "KronPSGD": dict(lr=1e-2, weight_decay=0.01, seed=3),
    # block_size 4 so the generic shapes get several padded tiles; Quad keeps bf16 factors.
    "WhiteKron": dict(lr=1e-2, block_size=4, dtype=torch.float32, seed=3),
    "Quad": dict(lr=1e-2, block_size=4, seed=3),
    "SOAP": dict(lr=1e-2, weight_decay=0.1, precondition_frequency=2, precondition_1d=True),
}

# Optimizers whose first step per param only initializes state (no update,
# step stays 0).
INIT_ONLY_FIRST_STEP = {"SOAP"}
